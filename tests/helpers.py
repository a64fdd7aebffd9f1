"""Helpers for tests that run the real job entry points (torchrun, 2 CPU processes over gloo)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# Small enough for CI, still the tiny config's model and data.
FAST = ["data.num_train_sequences=2048", "data.num_valid_sequences=64", "train.log_every=5",
        "train.eval_batches=2", "eval.num_samples=64", "sampling.steps=16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_job(module: str, run_dir: Path, *args: str, nproc: int = 2, config: Path | None = TINY,
            check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module --run-dir run_dir [--config] args`` under torchrun with ``nproc`` ranks."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    cmd += ["-m", module, "--run-dir", str(run_dir)]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag from metrics.jsonl, in write order."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["tag"] == tag:
            out.append((rec["step"], rec["value"]))
    return out
