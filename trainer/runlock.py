"""One writer per run folder: who holds ``<run>/run.lock.json``, and when a holder is gone.

Two submissions (or a submission and a job started by hand) writing into one run folder would write
the same checkpoints, shards and state file. So every writer takes the run folder's lock first:

* ``tools/submit.py --local`` holds it for the whole chain, as its process (host, pid). The stage
  processes it starts inherit ``SDTT_RUN_LOCK`` (the holder's token) and so recognise the lock as
  their own chain's.
* ``tools/submit.py`` for SLURM takes it as its process while it submits, then, before the held jobs
  are released, hands it to the chain: the holder becomes the chain's job ids. A job recognises it as
  its own by its job id (``SDTT_SLURM_JOB``, set by the job wrapper in cluster/stage_job.py). The
  chain's last job releases it when it is done. A failing job does not (SLURM may still requeue it:
  a lost node's job fails in its surviving tasks, then is requeued NODE_FAIL, docs/reliability.md):
  once none of the chain's jobs is pending or running, the lock is stale.
* every job (``trainer.jobs.common.entry``) checks the lock; a job started outside any chain (by
  hand) takes it itself, on rank 0, for its lifetime.

A second writer is refused with one line naming the holder. A holder that is gone is *stale* and
is taken over, with a message: a process holder on this host whose pid no longer runs (or now runs
another program: the start time is recorded), or a SLURM chain none of whose jobs squeue still lists
as pending or running. A process holder on another host cannot be checked from here: it counts as
live, and the message says how to clear it.

The lock record is JSON, written atomically; the read-check-write is made atomic across processes
by ``filelock`` on ``<run>/.run.lock`` (an OS lock, freed by the kernel when its process dies, so
that part never goes stale). Standard library and filelock only: cluster/ imports it.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from trainer.errors import BadInput
from trainer.fileio import atomic_write_json
from trainer.layout import RunLayout

TOKEN_ENV = "SDTT_RUN_LOCK"  # the holder's token, inherited by the processes of a --local chain
CHAIN_JOB_ENV = "SDTT_SLURM_JOB"  # the SLURM job id of a stage's process (cluster/stage_job.py sets it)
# squeue states of a job that may still run (everything else is final or unknown).
LIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                         "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                         "RESV_DEL_HOLD"})


class RunInUse(BadInput, RuntimeError):
    """Another live writer holds the run folder; the message names it (host, pid or job ids)."""


# --------------------------------------------------------------------------------------------------
# Holders
# --------------------------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown: a
    pid the kernel reuses for another program has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces and ')'


def this_process(what: str) -> dict[str, Any]:
    """A holder record for the calling process; ``what`` says what it is doing (shown to others)."""
    pid = os.getpid()
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001  (no user name in a container: not worth failing for)
        user = str(os.getuid())
    return {"kind": "process", "what": what, "host": socket.gethostname(), "pid": pid,
            "start": _start_time(pid), "user": user, "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "token": secrets.token_hex(8), "job_ids": []}


def describe(holder: Mapping[str, Any]) -> str:
    """One phrase naming a holder: what, and where (host and pid, or the SLURM job ids)."""
    since = f", since {holder.get('since', '?')}"
    if holder.get("kind") == "slurm":
        ids = holder.get("job_ids", [])
        return (f"the SLURM chain of jobs {', '.join(map(str, ids))} ({holder.get('what', '?')} by "
                f"{holder.get('user', '?')} on host {holder.get('host', '?')}{since})")
    return f"{holder.get('what', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since})"


def live_slurm_jobs(job_ids: Sequence[str]) -> set[str]:
    """The ids among ``job_ids`` that squeue lists as pending or running (may still write; not those
    pending on a dependency that can never be satisfied). Raises
    OSError when squeue cannot answer: the caller must then treat the holder as live."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return set()
    if shutil.which("squeue") is None:
        raise OSError("squeue is not on PATH")
    try:
        proc = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise OSError("squeue did not answer within 60 s") from None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # none of them is known any more
            return set()
        raise OSError(f"squeue failed: {proc.stderr.strip()}")
    live = set()
    for line in proc.stdout.splitlines():
        jid, state, reason = (line.strip().split("|") + ["", ""])[:3]
        # A job whose dependency failed waits forever (and the next submission cancels it).
        if jid in ids and state in LIVE_STATES and reason != "DependencyNeverSatisfied":
            live.add(jid)
    return live


def gone(holder: Mapping[str, Any]) -> str | None:
    """Why ``holder`` no longer holds the folder (it is stale), or None while it may still write."""
    if holder.get("kind") == "slurm":
        try:
            live = live_slurm_jobs(holder.get("job_ids", []))
        except OSError:
            return None  # cannot ask SLURM: assume the chain still runs
        return None if live else "none of its jobs is pending or running any more (squeue)"
    if holder.get("host") != socket.gethostname():
        return None  # another host's processes cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "the record names no process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "that process no longer runs"
    except PermissionError:
        pass  # it runs, as another user
    start = holder.get("start")
    if start is not None and _start_time(pid) not in (None, start):
        return "that process no longer runs (its pid now belongs to another program)"
    return None


def _is_own_chain(holder: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    """A job is inside the holder's chain: it carries the holder's token (--local) or is one of its
    SLURM jobs."""
    if env.get(TOKEN_ENV) and env.get(TOKEN_ENV) == holder.get("token"):
        return True
    job = env.get(CHAIN_JOB_ENV)
    return bool(job) and holder.get("kind") == "slurm" and job in map(str, holder.get("job_ids", []))


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------
class RunLock:
    """The lock of one run folder (``RunLayout.lock``). ``log`` receives the one-line messages
    (taking over a stale lock)."""

    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print) -> None:
        self.path = RunLayout(Path(run_dir)).lock
        self.log = log
        self.mine: dict[str, Any] | None = None

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path.with_name(f".{self.path.stem}")), timeout=60):
            yield

    def holder(self) -> dict[str, Any] | None:
        try:
            obj = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"kind": "corrupt"}  # written atomically, so only by hand: treated as stale
        return obj if isinstance(obj, dict) else {"kind": "corrupt"}

    def acquire(self, what: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Take the lock for this process (``what`` names it to others), or raise ``RunInUse`` naming
        the live holder. A stale holder is taken over, with a message."""
        with self._mutex():
            held = self.holder()
            if held is not None:
                why = "its lock record is unreadable" if held.get("kind") == "corrupt" else gone(held)
                if why is None:
                    raise RunInUse(self.refusal(held))
                self.log(f"run folder lock {self.path}: taking over from {describe(held)}: {why}")
            mine = this_process(what)
            atomic_write_json(self.path, mine)
            self.mine = mine
            return mine

    def refusal(self, held: Mapping[str, Any]) -> str:
        run = self.path.parent
        hint = ("wait for it to end or stop it (scancel), then submit again" if held.get("kind") == "slurm" else
                "wait for it to end or stop it, then submit again")
        if held.get("kind") != "slurm" and held.get("host") != socket.gethostname():
            hint += f"; if nothing runs on host {held.get('host')} any more, delete {self.path}"
        return f"{run} is in use by {describe(held)}; {hint}"

    def hand_to_jobs(self, job_ids: Sequence[str], what: str) -> None:
        """Make the SLURM chain ``job_ids`` the holder (the submission's process is about to exit);
        call it before any of the jobs can start."""
        with self._mutex():
            held = self.holder()
            if self.mine is None or held is None or held.get("token") != self.mine["token"]:
                raise RunInUse(f"{self.path}: the lock was taken over during the submission "
                               f"(now {describe(held) if held else 'nobody'})")
            chain = {**self.mine, "kind": "slurm", "what": what, "job_ids": [str(j) for j in job_ids]}
            atomic_write_json(self.path, chain)
            self.mine = None  # no longer this process's to release

    def release(self) -> None:
        """Give back a lock this process holds (a lock taken over by someone else is left alone)."""
        if self.mine is None:
            return
        with self._mutex():
            held = self.holder()
            if held is not None and held.get("token") == self.mine["token"]:
                self.path.unlink()
        self.mine = None


@contextlib.contextmanager
def held(run_dir: str | Path, what: str, log: Callable[[str], None] = print) -> Iterator[RunLock]:
    """Hold the run folder's lock for the ``with`` block (released however the block ends)."""
    lock = RunLock(run_dir, log)
    lock.acquire(what)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def for_job(run_dir: str | Path, what: str, env: Mapping[str, str] | None = None,
            log: Callable[[str], None] = print) -> Iterator[None]:
    """A job's view of the lock: inside its own chain's lock (``--local`` token, or one of the
    chain's SLURM job ids) it goes on; outside any chain, rank 0 takes the lock for the job's life
    (the other ranks of a job started by hand follow their rank 0, which refuses for all of them)."""
    env = os.environ if env is None else env
    lock = RunLock(run_dir, log)
    holder = lock.holder()
    if (holder is not None and _is_own_chain(holder, env)) or env.get("RANK", "0") != "0":
        yield
        return
    with held(run_dir, what, log):
        yield


def end_of_chain(run_dir: str | Path, job_id: str, failed: bool) -> bool:
    """Called by a SLURM job of a chain when its stage is done (``failed`` False) or failed: the
    chain ends with its last job, or with any failure (its dependants are cancelled). Releases the
    chain's lock then; True when it did."""
    lock = RunLock(run_dir)
    with lock._mutex():
        held = lock.holder()
        if held is None or held.get("kind") != "slurm":
            return False
        ids = [str(j) for j in held.get("job_ids", [])]
        if str(job_id) not in ids or not (failed or str(job_id) == ids[-1]):
            return False
        lock.path.unlink()
        return True
