"""The launch environment has one reader: submitit's view of a SLURM task (cluster.stage_job.task_rendezvous),
turned into the torchrun variables that the trainer (trainer.runtime.dist.read_env) reads. And the one
private submitit method the requeue fix replaces is still there, with the signature it is called with.

The SLURM variables below are what SLURM 22.05 sets in task 3 of ``srun -N2 --ntasks-per-node=2``
(measured on the local cluster); submitit reads them exactly as it does inside a job."""
from __future__ import annotations

import inspect
import re

import pytest
import submitit
from submitit.core.job_environment import SignalHandler
from submitit.slurm.slurm import SlurmJobEnvironment

from cluster import pipeline
from cluster.slurm import sigterm_proof_requeue
from cluster.stage_job import SLURM_PORT_BASE, SLURM_PORT_SPAN, StageJob, task_rendezvous
from tests.helpers import REPO, TINY
from trainer.config import load_config
from trainer.runtime.dist import read_env

TASK3 = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "12345", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
         "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}


@pytest.fixture
def slurm_task(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in TASK3.items():
        monkeypatch.setenv(key, value)
    return TASK3


def test_task_rendezvous_reads_the_slurm_task(slurm_task: dict[str, str]) -> None:
    r = task_rendezvous()
    assert (r.rank, r.local_rank, r.world_size, r.local_world_size, r.node_rank) == (3, 1, 4, 2, 1)
    assert r.master_addr == "gpu-07"  # rank 0 runs on the first host of the job's node list
    assert r.master_port == SLURM_PORT_BASE + 12345 % SLURM_PORT_SPAN  # every task derives the same port


def test_the_trainer_reads_back_what_the_job_wrapper_writes(slurm_task: dict[str, str]) -> None:
    stages = pipeline.build_chain(load_config(TINY))
    env, r = StageJob(stages[1], "/run", "/run/code/abc").child_environment(dict(slurm_task))
    assert env["PYTHONPATH"] == "/run/code/abc"
    back = read_env(env)
    assert (back.rank, back.local_rank, back.world_size, back.local_world_size, back.source) == (3, 1, 4, 2, "torchrun")
    assert (back.master_addr, back.master_port) == ("gpu-07", str(r.master_port))


def test_no_second_parser_of_slurm_variables() -> None:
    """SLURM's task variables are read in one place, submitit (called by cluster/stage_job.py). The one
    exception is dist.read_env's guard that refuses a multi-task srun launch without torchrun variables."""
    reads = re.compile(r'(environ|env)(\.get\(|\[)\s*"SLURM_(PROCID|LOCALID|NTASKS|STEP_NUM_TASKS|JOB_NODELIST|'
                       r'NODELIST|NODEID|TASKS_PER_NODE|STEP_TASKS_PER_NODE|JOB_ID|ARRAY_JOB_ID)')
    found = []
    for path in sorted([*(REPO / "trainer").rglob("*.py"), *(REPO / "cluster").rglob("*.py")]):
        for line in path.read_text().splitlines():
            if reads.search(line):
                found.append((str(path.relative_to(REPO)), line.strip()))
    assert found == [("trainer/runtime/dist.py", 'tasks = env.get("SLURM_STEP_NUM_TASKS", "1")')], found


# --------------------------------------------------------------------------------------------------
# The submitit private method cluster.slurm patches (sigterm_proof_requeue)
# --------------------------------------------------------------------------------------------------
def test_submitit_is_a_version_the_requeue_patch_was_made_for() -> None:
    major, minor = (int(x) for x in submitit.__version__.split(".")[:2])
    assert (major, minor) == (1, 5), (f"submitit {submitit.__version__}: cluster.slurm.sigterm_proof_requeue "
                                      "patches a private method of 1.5; check it, then widen the pin in pyproject.toml")


def test_the_patched_private_method_is_still_what_submitit_calls() -> None:
    """If submitit renames _requeue, changes its signature, or stops calling it on the preemption
    signal, the patch would silently do nothing: this fails instead."""
    assert list(inspect.signature(SlurmJobEnvironment._requeue).parameters) == ["self", "countdown"]
    assert re.search(r"\.env\._requeue\(", inspect.getsource(SignalHandler.checkpoint_and_try_requeue))
    original = SlurmJobEnvironment._requeue
    try:
        sigterm_proof_requeue()
        assert SlurmJobEnvironment._requeue is not original
        assert "requeue_job" in inspect.getsource(SlurmJobEnvironment._requeue)
    finally:
        SlurmJobEnvironment._requeue = original
