"""Integration tests against a REAL two-node SLURM cluster on this machine (cluster/local/up.sh).

Nothing is mocked: sbatch/srun/sacct/scancel, submitit, torch.distributed over gloo. If the
cluster cannot start, these tests fail (never skip): the ``slurm_cluster`` fixture (tests/conftest.py)
is the proof that it starts.

The fixture starts the cluster only if it is not already up (``make test`` starts it first) and
stops it afterwards only if it started it. Jobs run with this interpreter (submitit uses
``sys.executable``; run pytest from the venv) and find the repository through PYTHONPATH, which
sbatch copies into every job.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import submitit

from cluster.slurm import sigterm_proof_requeue
from tests.helpers.slurm import LOCAL, LocalSlurm

pytestmark = pytest.mark.slurm


def _executor(folder: Path, **params: Any) -> submitit.AutoExecutor:
    # cluster="slurm": fail loudly instead of silently falling back to local processes.
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**{"timeout_min": 5, "slurm_partition": "debug", "cpus_per_task": 1, "nodes": 1,
                            "tasks_per_node": 1, **params})
    return ex


def _wait(job: submitit.Job, timeout_s: float) -> None:
    """Wait for ``job`` to finish; on timeout cancel it and fail with what it printed."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            state = job.state
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s:.0f} s (state {state})\n"
                        f"stdout: {job.stdout()}\nstderr: {job.stderr()}")
        time.sleep(0.5)


def _squeue(job_id: str, fmt: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", fmt], capture_output=True, text=True).stdout.strip()


def _poll(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_up_is_a_no_op_while_running(slurm_cluster: LocalSlurm) -> None:
    proc = subprocess.run(["bash", str(LOCAL / "up.sh"), str(slurm_cluster.state_dir)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "SDTT_SLURM_STARTED=", proc.stdout


# --------------------------------------------------------------------------------------------------
# (a) two nodes really run tasks
# --------------------------------------------------------------------------------------------------
def test_srun_runs_one_task_on_each_node(slurm_cluster: LocalSlurm) -> None:
    script = 'echo "$SLURM_NODEID $SLURMD_NODENAME $(getent hosts n1 | cut -d" " -f1)"'
    proc = subprocess.run(["srun", "-N2", "-n2", "--time=1", "bash", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = sorted(line.split() for line in proc.stdout.strip().splitlines())
    assert rows == [["0", "n1", "127.0.0.1"], ["1", "n2", "127.0.0.1"]], proc.stdout


# --------------------------------------------------------------------------------------------------
# (b) submitit + its rendezvous (cluster.stage_job.task_rendezvous) + gloo across the two nodes
# --------------------------------------------------------------------------------------------------
def _all_reduce_job() -> dict[str, Any]:
    import socket

    import torch
    import torch.distributed as dist

    from cluster.stage_job import task_rendezvous

    r = task_rendezvous()  # submitit's reading of the SLURM task, as StageJob uses it
    os.environ.update(r.torchrun_env())
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    try:
        value = torch.tensor([float(r.rank + 1)])
        dist.all_reduce(value)
    finally:
        dist.destroy_process_group()
    return {"rank": r.rank, "local_rank": r.local_rank, "world_size": r.world_size, "node_rank": r.node_rank,
            "local_world_size": r.local_world_size, "node": os.environ["SLURMD_NODENAME"],
            "master_addr": r.master_addr, "master_ip": socket.gethostbyname(r.master_addr),
            "sum": value.item(), "python": sys.executable}


@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_submitit_gloo_all_reduce_across_nodes(slurm_cluster: LocalSlurm, tmp_path: Path,
                                               tasks_per_node: int) -> None:
    job = _executor(tmp_path, nodes=2, tasks_per_node=tasks_per_node).submit(_all_reduce_job)
    _wait(job, 180)
    results = job.results()  # one per task; job.result() asserts with several tasks
    world = 2 * tasks_per_node
    assert sorted(r["rank"] for r in results) == list(range(world))
    for r in results:
        assert r["world_size"] == world and r["local_world_size"] == tasks_per_node
        assert r["sum"] == world * (world + 1) / 2
        assert (r["master_addr"], r["master_ip"]) == ("n1", "127.0.0.1")  # resolves inside jobs
        assert r["node"] == f"n{r['node_rank'] + 1}"
        assert r["python"] == sys.executable
    assert {r["node"] for r in results} == {"n1", "n2"}


# --------------------------------------------------------------------------------------------------
# (c) afterok dependencies
# --------------------------------------------------------------------------------------------------
def _write_after(path: str, text: str, delay_s: float) -> str:
    time.sleep(delay_s)  # still running when the child is submitted
    Path(path).write_text(text)
    return text


def _read(path: str) -> str:
    return Path(path).read_text()


def _fail_after(delay_s: float) -> None:
    time.sleep(delay_s)
    raise RuntimeError("this parent fails on purpose")


def test_afterok_chain_runs_child_after_parent(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    message = tmp_path / "message.txt"
    parent = _executor(tmp_path).submit(_write_after, str(message), "from the parent", 2.0)
    child = _executor(tmp_path, slurm_additional_parameters={"dependency": f"afterok:{parent.job_id}"}).submit(
        _read, str(message))
    _wait(child, 120)
    assert parent.result() == "from the parent"
    assert child.result() == "from the parent"


def test_failed_parent_leaves_child_never_satisfied(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    parent = _executor(tmp_path).submit(_fail_after, 2.0)
    child = _executor(tmp_path, slurm_additional_parameters={"dependency": f"afterok:{parent.job_id}"}).submit(
        _read, str(tmp_path / "never-written"))
    _wait(parent, 120)
    with pytest.raises(submitit.core.utils.FailedJobError, match="fails on purpose"):
        parent.result()
    _poll(f"job {child.job_id} to show DependencyNeverSatisfied",
          lambda: _squeue(child.job_id, "%T %r") == "PENDING DependencyNeverSatisfied", 60)
    child.cancel()
    _poll(f"job {child.job_id} to be cancelled", lambda: child.state.startswith("CANCELLED"), 60)
    assert child.done()


# --------------------------------------------------------------------------------------------------
# (d) preemption: checkpoint, requeue, resume
# --------------------------------------------------------------------------------------------------
class _Counter(submitit.helpers.Checkpointable):
    """Counts to ``steps``; its attributes are what submitit checkpoints on preemption."""

    def __init__(self) -> None:
        self.count = 0
        self.starts: list[int] = []  # the count at each (re)start

    def __call__(self, steps: int, progress: str) -> dict[str, Any]:
        # The production fix for submitit's requeue race (see cluster.slurm.requeue_job).
        sigterm_proof_requeue()
        self.starts.append(self.count)
        while self.count < steps:
            time.sleep(0.25)
            self.count += 1
            Path(progress).write_text(f"{len(self.starts)} {self.count}")
        return {"count": self.count, "starts": self.starts}


def _progress(path: Path) -> tuple[int, int]:
    try:
        runs, count = path.read_text().split()
        return int(runs), int(count)
    except (OSError, ValueError):  # not written yet, or read mid-write
        return 0, 0


def test_preempted_checkpointable_job_is_requeued_and_resumes(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    progress = tmp_path / "progress.txt"
    steps = 40  # 10 s of work: the preemption (at 8) lands well before the end
    # timeout_min=60: submitit calls any signal a *timeout* when the time limit is 10 min or less
    # (guaranteed walltime min(0.8 T, T - 10 min) <= 0); 60 exercises its preemption path.
    job = _executor(tmp_path, timeout_min=60).submit(_Counter(), steps, str(progress))
    _poll("the job to make progress", lambda: _progress(progress)[1] >= 8, 60)
    job._interrupt()  # what SLURM does on preemption: SIGTERM, then USR2 (submitit checkpoints on USR2)
    _poll("the requeued job to run again", lambda: _progress(progress)[0] >= 2, 90)
    _wait(job, 120)
    result = job.result()
    assert result["count"] == steps
    assert len(result["starts"]) == 2 and result["starts"][0] == 0
    assert result["starts"][1] >= 8, "the second run did not resume from the checkpointed count"
