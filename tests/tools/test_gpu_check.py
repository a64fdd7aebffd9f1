"""GPU readiness that can be checked without a GPU: ``make gpu-check``'s no-GPU path and the Makefile's
conditional DS_ACCELERATOR (the device table behind the MFU: tests/unit/test_gpu_stats.py)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.helpers import REPO


def _make(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # -o .venv/.installed: use the venv as it is (never rebuild it from a test).
    return subprocess.run(["make", "-s", "-o", ".venv/.installed", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    return {**env, **extra}


def test_make_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path: Path) -> None:
    out = REPO / "runs" / "gpu-check" / "gpu_check.json"
    out.unlink(missing_ok=True)
    proc = _make("gpu-check", env=_clean_env(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU on this machine: nothing measured" in proc.stdout
    result = json.loads(out.read_text())
    assert result["gpu"] is None and result["checks"] == {} and "nothing measured" in result["skipped"]


def test_ds_accelerator_is_cpu_only_without_a_gpu(tmp_path: Path) -> None:
    show = ["--eval", "show-acc: ; @echo \"[$$DS_ACCELERATOR]\"", "show-acc"]
    assert _make(*show, env=_clean_env()).stdout.strip() == "[cpu]"  # no nvidia-smi here
    # A machine whose nvidia-smi lists a GPU: DeepSpeed is left to pick CUDA.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = _clean_env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert _make(*show, env=env).stdout.strip() == "[]"
