"""SLURM's commands, as the rest of cluster/ calls them: requeue (SIGTERM-proof), scancel, and the
state of jobs.

``job_states`` (for ``tools/submit.py --status``) reads squeue for jobs still queued (with the
pending reason) and sacct for the others.
"""
from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterable, Sequence

# Job states after which a job never runs again (everything else may still start, or is running).
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "PREEMPTED", "REVOKED"}


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
           for j, (st, why) in queued(ids, live_only=False).items()}
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


def job_state(job_id: str) -> str:
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


def queued(ids: Sequence[str], live_only: bool = True) -> dict[str, tuple[str, str]]:
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

