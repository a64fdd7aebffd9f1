"""What runs inside each SLURM job of the chain (cluster/submission.py submits them).

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
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import DelayedSubmission

from cluster import pipeline
from cluster.pipeline import Stage
from cluster.slurm import job_state, requeue_job, sigterm_proof_requeue
from trainer.layout import EXIT_PREEMPTED
from trainer.runlock import CHAIN_JOB_ENV, end_of_chain

# The trainer's stop signals (trainer/runtime/preempt.py StopFlag): stop at a step boundary and checkpoint.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def _say(msg: str) -> None:
    """Job-side log line (lands in the submitit log of the task)."""
    print(f"[sdtt-slurm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
_last_error_line = pipeline.last_error_line  # one home: cluster/pipeline.py (--local reads logs too)


def mark_cancelled(run_dir: Path, name: str, entry: Mapping[str, Any], why: str) -> None:
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
            mark_cancelled(run_dir, name, state[name], why)
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
        state = job_state(task.job_id)
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

