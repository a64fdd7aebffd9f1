"""One writer per run folder (trainer/runlock.py), with real processes: a live holder refuses a
second writer naming it (tools/submit.py included, before it writes anything), and a holder killed
with SIGKILL leaves a stale lock that the next writer takes over with a message (the rules without a
second process: tests/unit/test_runlock.py)."""
from __future__ import annotations

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
