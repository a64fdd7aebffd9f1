"""The fast suite (``make test-fast``: every test outside tests/conftest.py SLOW_FOLDERS) starts no
process: conftest's ``_fast_tests_start_no_process`` refuses each way Python starts one. This test
is itself a fast test, so each attempt below is refused before anything runs."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from tests.helpers import ProcessInFastTest


def test_every_way_to_start_a_process_is_refused_and_recorded(_fast_tests_start_no_process: list[str]) -> None:
    tried = _fast_tests_start_no_process
    with pytest.raises(ProcessInFastTest, match="started a process .*subprocess._fork_exec.*move it into"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    with pytest.raises(ProcessInFastTest, match=r"os\.system"):
        os.system("true")
    with pytest.raises(ProcessInFastTest, match=r"os\.fork"):
        multiprocessing.get_context("fork").Process(target=print).start()
    with pytest.raises(ProcessInFastTest, match=r"os\.posix_spawn"):
        os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ)
    # A swallowed refusal still fails the test at its end: the attempts are recorded.
    assert tried == ["subprocess._fork_exec", "os.system", "os.fork", "os.posix_spawn"]
    tried.clear()  # this test's attempts were its point
