"""The local SLURM cluster and runs on it, for the tests that use them (tests/pipeline/): the
session's cluster and local pipeline run (their fixtures: tests/conftest.py), ``tools/submit.py`` as a
subprocess, the state file of a chain, and waiting for a chain with its logs on failure."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster import pipeline
from tests.helpers import PIPELINE_OVERRIDES, REPO, TINY, env
from trainer.config import load_config

LOCAL = REPO / "cluster" / "local"
LOCAL_PIPELINE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class LocalSlurm:
    state_dir: Path
    started: tuple[str, ...]  # daemons this session started (empty: it was already up)


class LocalPipeline:
    """``tools/submit.py --local`` of the shortened tiny pipeline, running in the background."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.t0 = time.monotonic()
        self._log = open(run.parent / "submit-local.log", "w+")
        self._proc = subprocess.Popen(
            [sys.executable, "tools/submit.py", "--config", str(TINY), "--local", "--run-dir", str(run),
             *PIPELINE_OVERRIDES],
            cwd=REPO, env=env(), stdout=self._log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # its own process group: stop() ends torchrun's workers too
        self.seconds: float | None = None

    def wait(self) -> Path:
        """The finished run's folder; fails the test with the output when the run failed."""
        try:
            rc = self._proc.wait(timeout=max(1.0, LOCAL_PIPELINE_TIMEOUT_S - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            rc = None
        if self.seconds is None:
            self.seconds = time.monotonic() - self.t0
            sys.stderr.write(f"\n[local pipeline] finished in {self.seconds:.0f} s (exit {rc})\n")
        if rc != 0:
            self._log.seek(0)
            pytest.fail(f"tools/submit.py --local exited {rc}:\n{self._log.read()[-6000:]}", pytrace=False)
        return self.run

    def stop(self) -> None:
        """End the run if a session finishes without waiting for it (its group: this one run)."""
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._log.close()


def on_slurm(test: Callable) -> Callable:
    """The marks of a test that runs jobs on the local cluster (the unit tests below need none)."""
    return pytest.mark.slurm(pytest.mark.slow(test))


# What the emulated nodes offer: 2 CPUs and a share of the memory each, no GPU; one task per node,
# so distributed stages run 2 tasks on n1 and n2. A 60-minute limit: submitit calls any signal a
# *timeout* (not a preemption) when the limit is 10 minutes or less.
SLURM_FLAGS = ["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--partition", "debug",
               "--time", "60"]
FIT = ["slurm.cpus_per_task=1", "slurm.mem_gb_per_task=1"]
def submit(*args: str, extra_env: dict[str, str] | None = None, check: bool = True,
           cwd: Path = REPO) -> subprocess.CompletedProcess:
    e = {**env(), **(extra_env or {})}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "submit.py"), *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"submit {args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def stages_of(run: Path) -> list[pipeline.Stage]:
    return pipeline.build_chain(load_config(run / "config.yaml"))


def state(run: Path) -> dict[str, dict[str, Any]]:
    return pipeline.read_state(run)["stages"]


def task_logs(run: Path, stage: str) -> dict[int, str]:
    """rank -> everything the tasks of the stage's job wrote (stdout + stderr, all attempts)."""
    entry = state(run)[stage]
    folder, jid = Path(entry["folder"]), str(entry["job_id"])
    out: dict[int, str] = {}
    for f in sorted(folder.glob(f"{jid}_*_log.*")):
        rank = int(f.name.split("_")[1])
        out[rank] = out.get(rank, "") + f.read_text(errors="replace")
    return out


def diagnose(run: Path) -> str:
    """The state file and the end of every task log: what a failing assertion should show."""
    lines = [json.dumps(state(run), indent=1)[-4000:]]
    for st in stages_of(run):
        if "folder" in state(run).get(st.name, {}):
            for rank, text in task_logs(run, st.name).items():
                lines.append(f"---- {st.name} rank {rank}\n{text[-1500:]}")
    return "\n".join(lines)[-15000:]


def wait_for_run(run: Path, timeout_s: float, preemptions: tuple[Any, ...] = ()) -> None:
    """Poll the state file until every stage is done (fails on a failed/cancelled stage, with the
    logs), preempting stages as planned on the way (each has ``.stage`` and ``.poll(run, entry)``:
    tests/pipeline/test_slurm_pipeline.py ``Preemption``)."""
    names = [s.name for s in stages_of(run)]
    deadline = time.monotonic() + timeout_s
    while True:
        st = state(run)
        bad = {n: e for n, e in st.items() if e.get("status") in ("failed", "stopped", "cancelled")}
        if bad:
            pytest.fail(f"stages ended badly: {sorted(bad)}\n{diagnose(run)}", pytrace=False)
        if all(st.get(n, {}).get("status") == "done" for n in names):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the run was not done after {timeout_s:.0f} s\n{diagnose(run)}", pytrace=False)
        for p in preemptions:
            p.poll(run, st.get(p.stage, {}))
        time.sleep(0.02)  # fast: a shard is written in ~0.3 s
