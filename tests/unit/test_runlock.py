"""One writer per run folder (trainer/runlock.py): a stale record is taken over, a lock is released
after a normal run, another host's holder counts as live. With a live holder process:
tests/processes/test_runlock_holders.py; the SLURM holder (a chain's job ids) is tested against the real
cluster in tests/pipeline/test_local_slurm.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer import runlock
from trainer.layout import RunLayout


def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path):
    """A record whose pid now belongs to another program (another start time) is stale."""
    lock = runlock.RunLock(tmp_path, log=lambda m: None)
    record = runlock.this_process("an old holder")
    record["start"] = "1"  # this pid runs, but started at another time than the holder did
    lock.path.write_text(json.dumps(record))
    assert runlock.gone(record) == "that process no longer runs (its pid now belongs to another program)"
    lock.acquire("the next writer")
    lock.release()


def test_the_lock_is_released_after_a_normal_run_and_a_chain_job_writes_none(tmp_path: Path):
    run = tmp_path / "run"
    with runlock.held(run, "a chain") as lock:
        record = lock.holder()
        # A job of this chain (it carries the token) goes on without touching the record.
        with runlock.for_job(run, "job x", env={runlock.TOKEN_ENV: record["token"], "RANK": "0"}):
            assert lock.holder() == record
        # A job outside the chain is refused.
        with pytest.raises(runlock.RunInUse):
            with runlock.for_job(run, "job y", env={"RANK": "0"}):
                pass
    assert not RunLayout(run).lock.exists()
    with runlock.for_job(run, "job z", env={"RANK": "0"}):  # a job by hand takes it for its life
        assert runlock.RunLock(run).holder()["what"] == "job z"
    assert not RunLayout(run).lock.exists()


def test_another_hosts_holder_counts_as_live_and_the_message_says_how_to_clear_it(tmp_path: Path):
    lock = runlock.RunLock(tmp_path)
    record = {**runlock.this_process("a submission"), "host": "elsewhere", "pid": 1}
    lock.path.write_text(json.dumps(record))
    with pytest.raises(runlock.RunInUse) as e:
        lock.acquire("second")
    assert "pid 1 on host elsewhere" in str(e.value) and f"delete {lock.path}" in str(e.value)
