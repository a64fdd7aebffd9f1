"""The pipeline on SLURM, through submitit: submitting the chain, and what runs inside each job.

``submit_chain`` turns the pending stages of a run into one SLURM job each, chained with ``afterok``
dependencies:

* the code is snapshotted first into ``<run>/code/<content hash>`` (reused when identical) and every
  job runs from there (cwd and PYTHONPATH), so editing the repository after submitting changes no
  queued job;
* each stage gets the resources ``cluster.resources.stage_resources`` computes (what ``--dry-run``
  prints), ``--requeue``, and the preemption signal ``USR2@slurm.signal_lead_s``;
* before anything is queued, ``sbatch --test-only`` checks every distinct resource request, so one
  SLURM can never satisfy (nodes, CPUs, memory, partition) fails with SLURM's own reason;
* all jobs are submitted HELD, recorded in ``pipeline_state.json`` (status ``submitted`` with the job
  id), and only then released: no job can start (and write the state file) before the whole chain is
  recorded, and a failed submission cancels the half-submitted chain before anything ran;
* a run whose stages are all done submits nothing; a run with jobs still in the queue is refused
  (two jobs of one stage would write the same files), except jobs that can never start
  (``DependencyNeverSatisfied``), which are cancelled.

Inside a job, :class:`StageJob` (a submitit Checkpointable) runs in every task: it computes the
rendezvous from submitit's view of the SLURM task (:func:`task_rendezvous`), starts ``python -m <stage module> --run-dir
DIR ...`` as a child process with the torchrun variables set, and waits:

* child exits 0: rank 0 checks the product and marks the stage done;
* preemption or time limit (USR2): every task forwards the signal to its child (SLURM also delivers
  it to the children itself on this cluster; forwarding makes that independent of the proctrack
  plugin). The trainer's StopFlag makes all ranks stop at the same step boundary and checkpoint,
  and the child exits with EXIT_PREEMPTED. submitit calls ``checkpoint()`` on global rank 0 only,
  which WAITS for its child to have saved and exited before it lets submitit requeue the job
  (the requeue kills every task of the step). Stages without a StopFlag (targets, eval, ...) die on
  the signal; their rerun redoes only what was not published (targets: incomplete shards);
* child fails: the stage is marked failed, every stage downstream of it is recorded cancelled (SLURM
  cancels their jobs itself: they are submitted with ``--kill-on-invalid-dep=yes``, so none waits
  forever as ``PENDING DependencyNeverSatisfied``), and the job fails with a message naming the
  stage, exit code, the child's last error line, rank and log;
* child stopped by SIGTERM alone (no preemption signal): a plain ``scancel`` ends the stage and
  cancels its dependants (never requeued: the checkpoint stays for a resubmission), anything else
  is requeued or left to SLURM (``StageJob._stopped_without_checkpoint``).

``job_states`` (for ``tools/submit.py --status``) reads squeue for jobs still queued (with the
pending reason) and sacct for the others.

This module imports nothing from ``trainer/`` except ``trainer.config`` (the import rule tools ->
cluster -> trainer.config, which a test checks): the few trainer constants it needs are repeated
below and a test checks they agree.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import DelayedSubmission

from cluster import pipeline
from cluster.pipeline import Stage
from cluster.resources import ClusterSpec, StageResources, job_environment, stage_resources
from trainer.config import RunConfig
from trainer.layout import EXIT_PREEMPTED
from trainer.runlock import CHAIN_JOB_ENV, end_of_chain

__all__ = ["submit_chain", "job_states", "StageJob", "snapshot_code", "sigterm_proof_requeue", "requeue_job",
           "downstream", "EXIT_PREEMPTED", "CODE_DIRS"]

# What a job needs of the repository: copied into the run folder at submission.
CODE_DIRS = ("trainer", "cluster", "tools", "configs")
# The trainer's stop signals (trainer/runtime/preempt.py StopFlag): stop at a step boundary and checkpoint.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# Launcher variables a job must NOT inherit from the submitting shell: sbatch copies its environment
# into the job, and a RANK left there would make the trainer take it for a torchrun launch.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
# Job states after which a job never runs again (everything else may still start, or is running).
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "PREEMPTED", "REVOKED"}


def _say(msg: str) -> None:
    """Job-side log line (lands in the submitit log of the task)."""
    print(f"[sdtt-slurm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# SLURM commands
# --------------------------------------------------------------------------------------------------
def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def requeue_job(job_id: str) -> None:
    """``scontrol requeue JOB`` from inside the job, immune to the SIGTERM the requeue itself causes.

    On preemption SLURM sends SIGTERM and the preemption signal to every process of the step, in no
    guaranteed order, and ``scontrol requeue`` makes SLURM SIGTERM the step at once. submitit 1.5.4
    ignores SIGTERM in Python but runs scontrol as a child that does not: measured on the local
    cluster, 2 runs in 7 lost the race (scontrol died before sending the request: job FAILED, never
    requeued; or after: requeued, but with an error result already written). An ignored signal
    stays ignored across exec, so scontrol finishes its request (10 runs in 10).
    """
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True,
                   preexec_fn=_ignore_sigterm)


def sigterm_proof_requeue() -> None:
    """Make submitit's in-job requeue (after ``checkpoint()``) use :func:`requeue_job`. Call it inside
    the job, before a preemption can arrive (StageJob does, first thing)."""
    from submitit.core import logger
    from submitit.slurm.slurm import SlurmJobEnvironment

    def _requeue(self: SlurmJobEnvironment, countdown: int) -> None:
        requeue_job(self.job_id)
        logger.get_logger().info(f"Requeued job {self.job_id} ({countdown} remaining timeouts)")

    SlurmJobEnvironment._requeue = _requeue  # type: ignore[method-assign]


def scancel(job_ids: Iterable[str]) -> None:
    ids = [str(i) for i in job_ids]
    if ids:
        # A job that ended meanwhile makes scancel complain; that is not an error here.
        subprocess.run(["scancel", *ids], check=False, timeout=60, capture_output=True)


def _normalise_state(state: str) -> str:
    return state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 0" -> "CANCELLED"


def job_states(ids: Sequence[str]) -> dict[str, str]:
    """SLURM state of each job id: ``{"12": "COMPLETED", "13": "PENDING (Dependency)"}``; pending jobs
    carry their reason. Jobs still in the queue are read from squeue (current, and it knows pending
    jobs that accounting may not have recorded yet), the others from sacct (accounting). Ids neither
    knows are left out. Raises RuntimeError naming the command when sacct fails (e.g. accounting
    disabled) and some job is not in the queue."""
    ids = [str(i) for i in ids]
    out = {j: (f"{st} ({why})" if st == "PENDING" and why not in ("", "None") else st)
           for j, (st, why) in _queued(ids, live_only=False).items()}
    rest = [i for i in ids if i not in out]
    if rest:
        out.update(_sacct_states(rest))
    return out


def _sacct_states(ids: Sequence[str]) -> dict[str, str]:
    """{id: state word} from accounting; RuntimeError when sacct fails."""
    cmd = ["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,State"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sacct failed: {proc.stderr.strip() or proc.stdout.strip()}")
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():  # a requeued job has one record per start: the last one wins
        parts = line.split("|")
        if len(parts) >= 2 and parts[0] in ids:
            out[parts[0]] = _normalise_state(parts[1])
    return out


def _job_state(job_id: str) -> str:
    """One job's state word (RUNNING, CANCELLED, ...): sacct, else squeue; UNKNOWN if neither knows.
    sacct first: while a cancelled job's processes are killed squeue only says COMPLETING."""
    try:
        state = _sacct_states([job_id]).get(job_id)
        if state:
            return state
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        pass
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "UNKNOWN"
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"


def _queued(ids: Sequence[str], live_only: bool = True) -> dict[str, tuple[str, str]]:
    """Jobs among ``ids`` that slurmctld still lists: {id: (state, reason)}, only those that may still
    run unless ``live_only`` is False. squeue, not sacct: it needs no accounting, and is current."""
    ids = [str(i) for i in ids]
    if not ids:
        return {}
    proc = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # none of them is known any more
            return {}
        raise RuntimeError(f"squeue failed: {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        if jid in ids and not (live_only and state in FINAL_STATES):
            out[jid] = (state, reason)
    return out


# --------------------------------------------------------------------------------------------------
# Code snapshot
# --------------------------------------------------------------------------------------------------
def _code_files(repo: Path) -> list[Path]:
    files = []
    for top in CODE_DIRS:
        root = repo / top
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not found; the code snapshot needs {', '.join(CODE_DIRS)}")
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
                files.append(p)
    return files


def snapshot_code(repo: Path, run_dir: Path) -> Path:
    """Copy the job code into ``<run>/code/<content hash>`` (unless that snapshot exists) and return it.

    Named by content, so resubmitting unchanged code reuses the snapshot and a change makes a new
    one beside it (jobs already queued keep theirs). Written to a temporary folder and renamed, so a
    snapshot folder is always complete."""
    repo, run_dir = Path(repo).resolve(), Path(run_dir).resolve()
    files = _code_files(repo)
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(repo)).encode() + b"\0" + p.read_bytes() + b"\0")
    dest = run_dir / "code" / h.hexdigest()[:16]
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in files:
        target = tmp / p.relative_to(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    try:
        os.rename(tmp, dest)
    except OSError:  # a concurrent submission made the same snapshot first
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
    return dest


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def downstream(stages: Sequence[Stage], name: str) -> tuple[str, ...]:
    """Every stage that depends on ``name``, directly or not, in chain order."""
    out: list[str] = []
    hit = {name}
    for st in stages:  # topological order
        if any(d in hit for d in st.depends):
            out.append(st.name)
            hit.add(st.name)
    return tuple(out)


_last_error_line = pipeline.last_error_line  # one home: cluster/pipeline.py (--local reads logs too)


def _mark_cancelled(run_dir: Path, name: str, entry: Mapping[str, Any], why: str) -> None:
    """Mark stage ``name`` cancelled, keeping where its job was (mark replaces the whole entry)."""
    keep = {k: entry[k] for k in ("job_id", "folder", "code") if k in entry}
    pipeline.mark(run_dir, Stage(name, ""), "cancelled", reason=why, **keep)


# MASTER_PORT of a job: 20000 + job id % 12000, in [20000, 32000): unprivileged, and below Linux's
# ephemeral range (32768-60999), so no outgoing connection on the node holds it by chance (submitit's
# own pick, random in [20000, 60000] seeded by the job id, overlaps that range).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 12000


@dataclass(frozen=True)
class Rendezvous:
    """Where a task's child sits in the job, as the torchrun variables the trainer reads."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int

    def torchrun_env(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "GROUP_RANK": str(self.node_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def task_rendezvous() -> Rendezvous:
    """This SLURM task's rendezvous, read by submitit (``TorchDistributedEnvironment``: ranks from
    SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, rank 0 on the first host of the job's node list), with
    the port derived from the job id (``SLURM_PORT_BASE``). The one reader of SLURM's launch
    variables: the trainer reads only the torchrun variables this produces. Homogeneous jobs only
    (the same tasks on every node), which is what submit_chain submits."""
    tde = submitit.helpers.TorchDistributedEnvironment()
    job = submitit.JobEnvironment()
    digits = re.sub(r"\D", "", str(job.raw_job_id)) or "0"
    return Rendezvous(tde.rank, tde.local_rank, tde.world_size, tde.local_world_size, job.node, tde.master_addr,
                      SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN)


class _ChildEnded(BaseException):
    """Raised out of ``checkpoint()`` (a signal handler) into ``StageJob.__call__`` when the child had
    already finished (successfully or not) when the preemption signal came: nothing to requeue.
    A BaseException so that no ``except Exception`` on the way swallows it."""


class StageFailed(RuntimeError):
    """The stage's command failed; the message names the stage, exit code, rank and log."""


@dataclass(frozen=True)
class _Task:
    """Where this task sits: rank and job id as submitit reads them, plus the two things it does
    not keep (SLURM's restart count and node name)."""

    rank: int
    job_id: str
    restarts: int
    node: str

    @classmethod
    def current(cls, env: Mapping[str, str]) -> _Task:
        job = submitit.JobEnvironment()
        return cls(rank=job.global_rank, job_id=job.job_id, restarts=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
                   node=env.get("SLURMD_NODENAME", "?"))


class StageJob(submitit.helpers.Checkpointable):
    """One pipeline stage as a submitit job; runs in every task of the job (see the module doc)."""

    def __init__(self, stage: Stage, run_dir: str, code_dir: str, dependants: tuple[str, ...] = (),
                 stop_timeout_s: float = 90.0) -> None:
        self.stage = stage
        self.run_dir = str(run_dir)
        self.code_dir = str(code_dir)
        self.dependants = tuple(dependants)
        # How long rank 0 waits, on preemption, for its child to checkpoint and exit before it
        # kills it and requeues anyway (the restart then resumes from the previous checkpoint).
        self.stop_timeout_s = float(stop_timeout_s)

    # Only the spec is pickled (submission and checkpoint); the runtime state (process, thread,
    # event) belongs to one attempt and cannot be pickled anyway.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def _fresh(self) -> StageJob:
        return StageJob(self.stage, self.run_dir, self.code_dir, self.dependants, self.stop_timeout_s)

    # ---- the child --------------------------------------------------------------------------------
    def child_environment(self, environ: Mapping[str, str]) -> tuple[dict[str, str], Rendezvous]:
        """A copy of this task's environment with the torchrun variables of its rendezvous (rank 0 on
        the first node of the step, port from the job id) and the code snapshot on PYTHONPATH."""
        env = dict(environ)
        rdzv = task_rendezvous()
        env.update(rdzv.torchrun_env())
        env[CHAIN_JOB_ENV] = str(submitit.JobEnvironment().job_id)  # its chain's run folder lock is its own
        env["PYTHONPATH"] = self.code_dir
        env.setdefault("PYTHONUNBUFFERED", "1")
        # torch would otherwise start one thread per core of the node in every task.
        env.setdefault("OMP_NUM_THREADS", env.get("SLURM_CPUS_PER_TASK", "1"))
        return env, rdzv

    def _reap(self) -> None:
        assert self._proc is not None
        self._proc.wait()
        self._exited.set()

    def _wait_exit(self, timeout_s: float) -> bool:
        """Wait for the child to be reaped; True if it was. Polls a flag on purpose: this also runs
        inside a signal handler, where blocking on the Event's internal lock (which the interrupted
        main thread may hold) could deadlock."""
        deadline = time.monotonic() + timeout_s
        while not self._exited.is_set():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _forward(self, signum: int) -> None:
        proc = self._proc
        if proc is not None and not self._exited.is_set():
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass

    def _install_forwarding(self) -> None:
        """Forward the stop signals to the child, then hand them to submitit's own handlers (USR2:
        checkpoint and requeue on rank 0; TERM: logged and ignored)."""
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def handler(signum: int, frame: Any) -> None:
            self._signalled = signum
            self._forward(signum)
            if self._stopping:  # already inside checkpoint(): a second signal must not requeue twice
                return
            prev = previous.get(signum)
            if callable(prev):
                prev(signum, frame)

        for s in STOP_SIGNALS:
            signal.signal(s, handler)

    @staticmethod
    def _ignore_stop_signals() -> None:
        # Once the child has exited its outcome is decided: a late preemption signal must neither
        # requeue a finished stage nor interrupt the bookkeeping. SIG_IGN (not a mask) covers every
        # thread and is inherited by the scontrol/scancel children (SIGTERM-proof, see requeue_job).
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """Called by submitit on global rank 0 when the preemption/timeout signal arrives: let the
        child checkpoint and exit, then hand submitit the same job to requeue."""
        self._stopping = True
        proc = getattr(self, "_proc", None)
        if proc is None:  # not started yet: nothing to save, run it again later
            return DelayedSubmission(self._fresh())
        self._forward(signal.SIGUSR2)
        _say(f"stage {self.stage.name}: preemption signal: waiting up to {self.stop_timeout_s:.0f} s for the "
             "child to checkpoint and exit")
        t0 = time.monotonic()
        if not self._wait_exit(self.stop_timeout_s):
            _say(f"stage {self.stage.name}: the child did not stop within {self.stop_timeout_s:.0f} s: killing it; "
                 "the restart resumes from its last complete checkpoint")
            proc.kill()  # a straggler must not write into the run folder while the restart runs
            self._wait_exit(60)
            return DelayedSubmission(self._fresh())
        rc = proc.returncode
        if self._is_stopped(rc):
            _say(f"stage {self.stage.name}: child stopped (exit {rc}) after {time.monotonic() - t0:.1f} s; "
                 "requeueing")
            return DelayedSubmission(self._fresh())
        raise _ChildEnded(rc)  # it had finished (or failed) on its own: __call__ takes it from here

    def _is_stopped(self, rc: int | None) -> bool:
        """The child stopped because of a stop signal (so the job is to be requeued, not failed):
        the trainer's EXIT_PREEMPTED, killed by a stop signal before its handler was installed (or a
        job without one), or any failure after this task was signalled (a rank whose peer stopped
        sees its connections close)."""
        if rc is None or rc == 0:
            return False
        return rc == EXIT_PREEMPTED or -rc in STOP_SIGNALS or self._signalled is not None

    # ---- bookkeeping ------------------------------------------------------------------------------
    def _log_hint(self, task: _Task) -> str:
        folder = os.environ.get("SUBMITIT_FOLDER", "")
        return str(Path(folder) / f"{task.job_id}_{task.rank}_log.err") if folder else "the job's stderr"

    def _cancel_dependants(self, why: str) -> list[str]:
        """Record every downstream stage's job as cancelled, with the reason; returns 'stage (job N)'
        for each. SLURM itself cancels the jobs: each was submitted with ``--kill-on-invalid-dep=yes``,
        so once this job fails (or is cancelled) its afterok dependants, and theirs, are ended."""
        run_dir = Path(self.run_dir)
        state = pipeline.read_state(run_dir)["stages"]
        victims = {n: str(state[n]["job_id"]) for n in self.dependants
                   if state.get(n, {}).get("status") in ("submitted", "running") and "job_id" in state[n]}
        for name in victims:
            _mark_cancelled(run_dir, name, state[name], why)
        return [f"{n} (job {j})" for n, j in victims.items()]

    def _mark(self, task: _Task, status: str, **extra: Any) -> None:
        """Record the stage's status with where its job is (mark replaces the whole entry)."""
        pipeline.mark(Path(self.run_dir), self.stage, status, job_id=task.job_id, restarts=task.restarts,
                      folder=os.environ.get("SUBMITIT_FOLDER", ""), code=self.code_dir, log=self._log_hint(task),
                      **extra)

    def _fail(self, task: _Task, why: str, status: str = "failed", **extra: Any) -> StageFailed:
        log = self._log_hint(task)
        self._mark(task, status, rank=task.rank, reason=why, **extra)
        cancelled = self._cancel_dependants(f"upstream stage {self.stage.name} {status}: {why}")
        # The lock stays with the chain: a failed task need not end its job. When a node is lost,
        # the surviving ranks fail (their peer's sockets close), but SLURM then ends the job
        # NODE_FAIL and requeues it, and its dependants still run (tools/chaos.py --slurm, measured in
        # docs/reliability.md). Released here, the requeued chain's parallel stages took the lock
        # each for itself and refused one another. Once none of the chain's jobs is pending or
        # running the lock is stale (runlock.gone), and the next submission takes it over.
        msg = (f"stage '{self.stage.name}' {status}: {why} (job {task.job_id}, rank {task.rank}, log {log}); "
               + (f"cancelled its dependants: {', '.join(cancelled)}" if cancelled else "no dependant was queued"))
        _say(msg)
        return StageFailed(msg)

    def _stopped_without_checkpoint(self, task: _Task, rc: int) -> dict[str, Any]:
        """Rank 0's child stopped on a signal other than the preemption signal (submitit's checkpoint()
        did not run), or on its own (train.stop_after). What SLURM is doing with the job decides:

        * CANCELLED (``scancel``): the user ended the stage. Its dependants are cancelled too (they
          could never start); the checkpoint stays, so resubmitting the run resumes it;
        * RUNNING (nobody is ending the job: ``scancel --signal=TERM``, or the job stopped itself) or
          TIMEOUT (the limit came without the USR2 being handled): requeue it, SIGTERM-proof;
        * anything else (PREEMPTED, REQUEUED, NODE_FAIL, ...): SLURM is ending or requeueing the job
          itself; there is nothing to add.
        Measured on the local cluster: during ``scancel``'s KillWait, squeue and scontrol only say
        COMPLETING while sacct already says CANCELLED, hence sacct first.
        """
        state = _job_state(task.job_id)
        why = f"child stopped (exit {rc}, signal {self._signalled or 'none'}), SLURM reports the job {state}"
        if state == "CANCELLED":
            raise self._fail(task, f"the job was cancelled while running ({why}); resubmit the run to resume "
                                   "from its checkpoint", status="cancelled", returncode=rc)
        if state in ("RUNNING", "TIMEOUT"):
            try:
                requeue_job(task.job_id)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                detail = (getattr(e, "stderr", "") or str(e)).strip()
                raise self._fail(task, f"{why} and could not be requeued ({detail}); resubmit the run to resume "
                                       "from its checkpoint", status="stopped", returncode=rc) from None
            _say(f"stage {self.stage.name}: {why}: requeued job {task.job_id}")
            raise SystemExit(-1)  # as submitit does after a requeue: no result file for this attempt
        _say(f"stage {self.stage.name}: {why}: leaving it to SLURM")
        return {"stage": self.stage.name, "rank": task.rank, "status": "stopped", "returncode": rc}

    # ---- the task ---------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        sigterm_proof_requeue()
        self._proc: subprocess.Popen | None = None
        self._exited = threading.Event()
        self._signalled: int | None = None
        self._stopping = False
        run_dir, st = Path(self.run_dir), self.stage
        task = _Task.current(os.environ)
        if pipeline.is_done(run_dir, st):  # a requeue after it finished: nothing to do
            _say(f"stage {st.name}: already done")
            return {"stage": st.name, "rank": task.rank, "status": "done", "returncode": 0}

        env, rdzv = self.child_environment(os.environ)
        cmd = st.command(run_dir, python=sys.executable)
        _say(f"stage {st.name}: job {task.job_id} restart {task.restarts}: rank {rdzv.rank}/{rdzv.world_size} "
             f"(local {rdzv.local_rank}/{rdzv.local_world_size}, node rank {rdzv.node_rank}) on {task.node}; "
             f"master {rdzv.master_addr}:{rdzv.master_port}; code {self.code_dir}\n  {shlex.join(cmd)}")
        t0 = time.time()
        if task.rank == 0:
            self._mark(task, "running")

        self._proc = subprocess.Popen(cmd, env=env, cwd=self.code_dir)
        threading.Thread(target=self._reap, name="reap-child", daemon=True).start()
        self._install_forwarding()
        try:
            self._wait_exit(float("inf"))  # signal handlers run in here (and may end the task)
            self._ignore_stop_signals()
        except _ChildEnded:  # checkpoint() found the child already finished
            self._ignore_stop_signals()
            self._wait_exit(float("inf"))
        rc = self._proc.returncode
        seconds = round(time.time() - t0, 1)

        if rc == 0:
            if task.rank != 0:
                return {"stage": st.name, "rank": task.rank, "status": "done", "returncode": 0}
            if not (run_dir / st.product).exists():
                raise self._fail(task, f"exited 0 but did not write {run_dir / st.product}", returncode=rc)
            self._mark(task, "done", seconds=seconds)
            _say(f"stage {st.name}: done in {seconds:.0f} s")
            if end_of_chain(run_dir, task.job_id, failed=False):
                _say(f"stage {st.name}: the chain is done: released the run folder's lock")
            pipeline.release_outputs(run_dir, st, _say)
            return {"stage": st.name, "rank": 0, "status": "done", "returncode": 0}

        if self._is_stopped(rc):
            if task.rank != 0:  # rank 0 decides for the job (a requeue ends this task too)
                _say(f"stage {st.name}: child stopped (exit {rc}) on a stop signal; rank 0 requeues or ends the job")
                return {"stage": st.name, "rank": task.rank, "status": "stopped", "returncode": rc}
            return self._stopped_without_checkpoint(task, rc)

        why = f"exit code {rc}"
        last = _last_error_line(self._log_hint(task))
        raise self._fail(task, why + (f" ({last})" if last else ""), returncode=rc)


# --------------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------------
KILL_ON_BAD_EXIT = "--kill-on-bad-exit=1"


def executor_parameters(res: StageResources, cfg: RunConfig, code_dir: Path, dependency_ids: Sequence[str],
                        env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one stage: the resources ``--dry-run`` shows, with job
    ids in place of stage names in the dependency. ``env``: variables exported in the job
    (``cluster.resources.job_environment``)."""
    return {
        "job_name": res.job_name, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "mem": res.mem,
        "time": res.time_min, "signal_delay_s": cfg.slurm.signal_lead_s,
        "setup": setup_lines(cfg, code_dir, env or {}),
        # srun options of the job step, after submitit's own: --kill-on-bad-exit ends every task once one
        # fails (a rank that hit engine.collective_timeout_s exits 3 while a hung rank would hold the
        # allocation until its time limit; measured in docs/reliability.md), then the site's
        # (containers: pyxis --container-image, ...).
        "srun_args": [KILL_ON_BAD_EXIT, *cfg.slurm.srun_args],
        # Held until the whole chain is recorded (submit_chain releases it).
        "additional_parameters": {"requeue": res.requeue, "hold": True,
                                  **({"gpus_per_node": res.gpus_per_node} if res.gpus_per_node > 0 else {}),
                                  **({"dependency": "afterok:" + ":".join(dependency_ids),
                                      "kill_on_invalid_dep": "yes"} if dependency_ids else {}),
                                  **{k.replace("-", "_"): (True if v == "" else v) for k, v in res.extra.items()}},
    }


def setup_lines(cfg: RunConfig, code_dir: Path, env: Mapping[str, str]) -> list[str]:
    """The job script's lines before ``srun``: the site's ``slurm.setup`` (module load, conda, ...),
    the job environment, then what makes the job run the snapshot, never the live repository, and
    derive its rendezvous from SLURM alone (see LAUNCHER_VARS)."""
    q = shlex.quote(str(code_dir))
    return [*cfg.slurm.setup, *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
            f"unset {' '.join(LAUNCHER_VARS)}", f"export PYTHONPATH={q}", f"cd {q}"]


def submit_chain(stages: list[Stage], cfg: RunConfig, spec: ClusterSpec, run_dir: Path, repo: Path,
                 log: Callable[[str], None] = print,
                 on_recorded: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Submit every pending stage of the run as a SLURM job; returns {stage: job id} (empty when
    everything is done). See the module doc for the guarantees. ``on_recorded`` gets {stage: job id}
    once the whole chain is recorded, before any job can start (tools/submit.py hands the run
    folder's lock to the chain there); if it raises, the held chain is cancelled."""
    run_dir = Path(run_dir).resolve()
    todo = pipeline.pending(run_dir, stages)
    if not todo:
        log(f"nothing to submit: every stage of {run_dir} is done")
        return {}
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on PATH: submit from a machine of the SLURM cluster (or use --local)")
    preflight(todo, cfg, spec)
    _clear_queue(run_dir, todo, log)
    code_dir = snapshot_code(Path(repo), run_dir)
    env = job_environment(cfg, os.environ)
    attempt = time.strftime("%Y%m%d-%H%M%S")
    stop_timeout = max(30.0, cfg.slurm.signal_lead_s - 30.0)  # leave time to requeue before the kill
    submitted: dict[str, str] = {}
    rows = []
    try:
        for st in todo:
            res = stage_resources(st, cfg, spec, run_dir.name)
            deps = [submitted[d] for d in st.depends if d in submitted]
            folder = run_dir / "logs" / "slurm" / st.name / attempt
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.slurm.max_requeues)
            ex.update_parameters(**executor_parameters(res, cfg, code_dir, deps, env))
            job = ex.submit(StageJob(st, str(run_dir), str(code_dir), downstream(stages, st.name), stop_timeout))
            submitted[st.name] = job.job_id
            pipeline.mark(run_dir, st, "submitted", job_id=job.job_id, folder=str(folder), code=str(code_dir))
            rows.append((st.name, job.job_id, f"{res.nodes} x {res.tasks_per_node}",
                         ", ".join(f"{d} ({submitted[d]})" for d in st.depends if d in submitted) or "-"))
        if on_recorded is not None:
            on_recorded(dict(submitted))
    except Exception as e:
        scancel(submitted.values())  # all still held: none of them ran
        now = pipeline.read_state(run_dir)["stages"]
        for name in submitted:
            _mark_cancelled(run_dir, name, now.get(name, {}), "submission of the chain failed")
        where = next((s.name for s in todo if s.name not in submitted), "?")
        raise RuntimeError(f"submitting stage '{where}' failed: {e}"
                           + (f"; cancelled the {len(submitted)} job(s) already submitted" if submitted else "")) from e
    release = subprocess.run(["scontrol", "release", ",".join(submitted.values())], capture_output=True, text=True,
                             timeout=60)
    if release.returncode != 0:
        raise RuntimeError(f"scontrol release {','.join(submitted.values())} failed: {release.stderr.strip()}; "
                           "the jobs stay held (release them by hand, or scancel them)")
    skipped = [s.name for s in stages if s not in todo]
    done = f"\nalready done: {', '.join(skipped)}" if skipped else ""
    log(f"run folder: {run_dir}\ncode snapshot: {code_dir}{done}")
    width = max(len(r[0]) for r in rows)
    log(f"{'stage':<{width}}  {'job id':>8}  nodes x tasks  after")
    for name, jid, shape, after in rows:
        log(f"{name:<{width}}  {jid:>8}  {shape:<13}  {after}")
    log(f"follow it with: tools/submit.py --status {run_dir}")
    return submitted


def preflight(todo: Sequence[Stage], cfg: RunConfig, spec: ClusterSpec) -> None:
    """Ask SLURM (``sbatch --test-only``: nothing is submitted) whether it can ever run each distinct
    resource request of the chain, so that an impossible one (too many nodes, CPUs or memory, an
    unknown partition or account) fails before any job is queued, with SLURM's own reason."""
    shapes: dict[tuple[str, ...], str] = {}
    for st in todo:
        lines = tuple(line for line in stage_resources(st, cfg, spec).sbatch_lines()
                      if not line.startswith(("--dependency=", "--job-name=", "--kill-on-invalid-dep")))
        shapes.setdefault(lines, st.name)
    for lines, name in shapes.items():
        proc = subprocess.run(["sbatch", "--test-only", *lines, "--wrap", "true"], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            why = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise RuntimeError(f"SLURM refuses the resources of stage '{name}' ({' '.join(lines)}): "
                               f"{why[-1] if why else 'sbatch --test-only failed'}; nothing was submitted")


def _clear_queue(run_dir: Path, todo: list[Stage], log: Callable[[str], None]) -> None:
    """Refuse to submit a stage whose previous job may still run; cancel those that never can."""
    state = pipeline.read_state(run_dir)["stages"]
    recorded = {str(state[s.name]["job_id"]): s.name for s in todo if "job_id" in state.get(s.name, {})}
    live = _queued(list(recorded))
    orphans = {j: v for j, v in live.items() if v[0] == "PENDING" and v[1] == "DependencyNeverSatisfied"}
    if orphans:
        scancel(orphans)
        log("cancelled jobs that could never start (DependencyNeverSatisfied): "
            + ", ".join(f"{recorded[j]} ({j})" for j in orphans))
    busy = {j: v for j, v in live.items() if j not in orphans}
    if busy:
        listed = ", ".join(f"{recorded[j]} (job {j}, {state_})" for j, (state_, _) in busy.items())
        raise RuntimeError(f"{run_dir} still has jobs in the queue: {listed}; wait for them "
                           f"(tools/submit.py --status {run_dir}) or scancel them, then submit again")
