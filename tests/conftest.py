"""Session fixtures shared by several test modules.

* ``slurm_cluster``: the real two-node SLURM cluster of cluster/local/ (tests/pipeline/test_local_slurm.py,
  tests/pipeline/test_slurm_pipeline.py). ``make test`` starts it before pytest (and exports
  SDTT_SLURM_STATE and the variables of its env.sh); the fixture then finds it up, uses it and
  leaves it running for the Makefile to stop. Run directly, pytest starts it here and stops it at
  the end of the session. If it cannot start, the tests fail (never skip): the fixture is the proof
  that it starts.
* ``local_pipeline``: the shortened tiny pipeline (tests/pipeline/test_pipeline.py OVERRIDES) run on this
  machine by ``tools/submit.py --local``: tests/pipeline/test_pipeline.py checks it,
  tests/pipeline/test_slurm_pipeline.py
  compares the SLURM run with it, and one session computes it once.
  It starts in the background as soon as a test asks for it, so a module can run SLURM jobs while it
  computes; ``wait()`` returns its folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, ProcessInFastTest
from tests.helpers.slurm import LOCAL, LocalPipeline, LocalSlurm

# Folders whose tests start processes (torchrun, SLURM jobs, whole pipelines, tools run as a user runs
# them, library code with its worker or helper processes): `pytest -m "not slow"` leaves them out, for
# an inner loop of unit tests only, which start none (``_fast_tests_start_no_process`` below holds
# them to it).
SLOW_FOLDERS = ("runtime", "jobs", "pipeline", "tools", "processes")
STATE_DIR = Path(os.environ.get("SDTT_SLURM_STATE", "/tmp/sdtt-slurm"))
UP_TIMEOUT_S = 600  # a cold start installs packages: ~20 s measured, generous for slow mirrors



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        if item.path.relative_to(tests_dir).parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


# Every way a Python process starts another: subprocess (run, check_call, Popen, os.popen) through the
# fork_exec it bound at import (or os.posix_spawn), multiprocessing's spawn and forkserver through
# _posixsubprocess.fork_exec, its fork through os.fork; the rest are os calls.
PROCESS_STARTERS = (("subprocess", "_fork_exec"), ("_posixsubprocess", "fork_exec"), ("os", "fork"),
                    ("os", "forkpty"), ("os", "posix_spawn"), ("os", "posix_spawnp"), ("os", "system"))


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request: pytest.FixtureRequest,
                                 monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The fast suite (``make test-fast``) starts no process: a test that needs one belongs in a slow
    folder. The attempt raises, and the test fails even if the code under test swallowed the error.
    Yields the attempts (tests/unit/test_fast_suite.py reads and clears them)."""
    if request.node.get_closest_marker("slow") is not None:
        yield []
        return
    tried: list[str] = []

    def refuse(name: str):
        def starter(*args, **kwargs):
            tried.append(name)
            raise ProcessInFastTest(f"{request.node.nodeid} started a process ({name}): a fast test starts none; "
                                    f"move it into one of tests/{{{','.join(SLOW_FOLDERS)}}}/")
        return starter

    for module, attr in PROCESS_STARTERS:
        monkeypatch.setattr(f"{module}.{attr}", refuse(f"{module}.{attr}"))
    yield tried
    if tried:
        pytest.fail(f"{request.node.nodeid} started a process ({', '.join(tried)}); fast tests start none",
                    pytrace=False)


# --------------------------------------------------------------------------------------------------
# The local SLURM cluster
# --------------------------------------------------------------------------------------------------
def _sourced_env(env_file: Path) -> dict[str, str]:
    """The variables that sourcing ``env_file`` sets or changes."""
    out = subprocess.run(["bash", "-c", f'set -a; source "{env_file}"; env -0'], check=True,
                         capture_output=True, text=True).stdout
    after = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in after.items() if os.environ.get(k) != v and not k.startswith(("BASH", "SHLVL", "_"))}


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    # up.sh is idempotent: when `make test` (or anyone) already started the cluster it checks that
    # every daemon runs and prints SDTT_SLURM_STARTED= (nothing started, so nothing to stop here).
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(LOCAL / "up.sh"), str(STATE_DIR)], capture_output=True, text=True,
                          timeout=UP_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"cluster/local/up.sh failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert last.startswith("SDTT_SLURM_STARTED="), f"unexpected up.sh output: {proc.stdout!r}"
    started = tuple(n for n in last.split("=", 1)[1].split(",") if n)
    sys.stderr.write(f"\n[local slurm] up.sh took {time.monotonic() - t0:.1f} s, started: {started or 'nothing'}\n")

    with pytest.MonkeyPatch.context() as mp:
        for key, value in _sourced_env(STATE_DIR / "env.sh").items():
            mp.setenv(key, value)
        # Jobs unpickle functions of test modules (tests.pipeline.test_local_slurm) and import cluster.*.
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
        yield LocalSlurm(STATE_DIR, started)

    if started:
        down = subprocess.run(["bash", str(LOCAL / "down.sh"), str(STATE_DIR)], capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, f"cluster/local/down.sh failed:\n{down.stderr[-4000:]}"


# --------------------------------------------------------------------------------------------------
# The local pipeline run
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def local_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPipeline]:
    run = LocalPipeline(tmp_path_factory.mktemp("pipeline") / "demo")
    yield run
    run.stop()

