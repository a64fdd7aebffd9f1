"""The run folder's lock held by a SLURM chain (trainer/runlock.py), against the real local cluster:
while one of the chain's jobs is queued or running a second writer is refused naming the job ids,
the chain's own jobs (their job id, set by the job wrapper) go on under it, and once SLURM no longer
runs any of them the lock is stale and taken over with a message. The chain's last job (or a
failing one) releases it."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.slurm import LocalSlurm
from trainer import runlock
from trainer.layout import RunLayout

pytestmark = pytest.mark.slurm


def _sbatch_sleep() -> str:
    out = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-t", "5", "-c", "1", "--wrap", "sleep 300"],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip().split(";")[0]


def test_a_chain_holds_the_lock_while_its_jobs_live(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = _sbatch_sleep()
    try:
        submission = runlock.RunLock(run)
        submission.acquire("tools/submit.py")
        submission.hand_to_jobs(["999999", job], "tools/submit.py")  # one long gone, one queued or running
        with pytest.raises(runlock.RunInUse) as e:
            runlock.RunLock(run).acquire("second submission")
        assert f"the SLURM chain of jobs 999999, {job}" in str(e.value)
        with runlock.for_job(run, "job of the chain", env={runlock.CHAIN_JOB_ENV: job, "RANK": "0"}):
            assert runlock.RunLock(run).holder()["job_ids"] == ["999999", job]
    finally:
        subprocess.run(["scancel", job], check=False, timeout=60)
    deadline = time.monotonic() + 120
    while runlock.live_slurm_jobs([job]):
        assert time.monotonic() < deadline, f"job {job} still listed as live 120 s after scancel"
        time.sleep(0.5)
    said: list[str] = []
    lock = runlock.RunLock(run, log=said.append)
    lock.acquire("next submission")
    assert len(said) == 1 and f"taking over from the SLURM chain of jobs 999999, {job}" in said[0]
    assert "none of its jobs is pending or running" in said[0]
    lock.release()


def test_the_last_job_or_a_failure_ends_the_chain(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    for ended_by, failed, released in (("1", False, False), ("2", False, True), ("1", True, True)):
        lock = runlock.RunLock(tmp_path)
        lock.acquire("tools/submit.py")
        lock.hand_to_jobs(["1", "2"], "tools/submit.py")
        assert runlock.end_of_chain(tmp_path, ended_by, failed=failed) is released
        assert RunLayout(tmp_path).lock.exists() is not released
        RunLayout(tmp_path).lock.unlink(missing_ok=True)
