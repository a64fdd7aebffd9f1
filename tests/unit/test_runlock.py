"""One writer per run folder (trainer/runlock.py), with real processes: a live holder refuses a
second writer naming it (tools/submit.py included, before it writes anything), a holder killed with
SIGKILL leaves a stale lock that the next writer takes over with a message, and a lock is released
after a normal run. The SLURM holder (a chain's job ids) is tested against the real cluster in
tests/pipeline/test_local_slurm.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, env
from trainer import runlock
from trainer.layout import RunLayout

HOLD = """
import sys, time
from trainer import runlock
with runlock.held(sys.argv[1], "a test holder"):
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """A live process that holds tmp_path/run's lock; yields (run folder, process)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        yield run, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_second_writer_is_refused_naming_the_holder(holder):
    run, proc = holder
    with pytest.raises(runlock.RunInUse) as e:
        runlock.RunLock(run).acquire("second writer")
    msg = str(e.value)
    assert f"a test holder (pid {proc.pid} on host {socket.gethostname()}" in msg and str(run) in msg
    assert runlock.RunLock(run).holder()["pid"] == proc.pid  # the holder's record is untouched


def test_a_second_submission_is_refused_before_it_writes(holder):
    run, proc = holder
    out = subprocess.run([sys.executable, "tools/submit.py", "--config", str(TINY), "--local", "--run-dir", str(run)],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run} is in use by a test holder (pid {proc.pid} "), lines
    assert not RunLayout(run).config.exists()  # nothing written into the folder in use


def test_a_job_started_by_hand_is_refused_with_one_line(holder):
    run, proc = holder
    out = subprocess.run([sys.executable, "-m", "trainer.jobs.prepare", "--run-dir", str(run), "--config", str(TINY)],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error (rank 0): {run} is in use by a test holder (pid {proc.pid}")
    assert not RunLayout(run).data_info.exists()


def test_a_killed_holders_lock_is_taken_over_with_a_message(holder):
    run, proc = holder
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert RunLayout(run).lock.exists()  # SIGKILL leaves the record behind
    said: list[str] = []
    lock = runlock.RunLock(run, log=said.append)
    mine = lock.acquire("the next writer")
    assert len(said) == 1 and f"taking over from a test holder (pid {proc.pid}" in said[0]
    assert "no longer runs" in said[0]
    assert lock.holder() == mine and mine["pid"] == os.getpid()
    lock.release()
    assert not RunLayout(run).lock.exists()


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
