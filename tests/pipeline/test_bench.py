"""tools/bench.py: every subcommand runs end to end on tiny settings and ends with one JSON line that
holds its ratio keys. Smoke tests only: no timing is asserted (speed targets live in the benchmarks
themselves, docs/benchmarks.md)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, env

BENCH = REPO / "tools" / "bench.py"
# Tiny data and batches: the smallest settings the tiny config's pipeline accepts.
SMALL = ["data.num_train_sequences=256", "data.num_valid_sequences=64", "distill.global_batch_size=8",
         "distill.loader_workers=0"]


def _bench(*args: str, timeout: int = 240) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"bench {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)  # the JSON line is the last line of stdout
    assert result["bench"] == args[0]
    assert len(proc.stdout.strip().splitlines()) > 2  # and a readable table came before it
    return result


def _has_ratios(result: dict, keys: set[str]) -> None:
    assert keys <= set(result["ratios"]), (keys, result["ratios"])
    assert all(isinstance(result["ratios"][k], float) and math.isfinite(result["ratios"][k]) for k in keys)


@pytest.fixture(scope="module")
def target_set(tmp_path_factory) -> Path:
    """A real target set, made by the targets job through the bench's own helper."""
    from tools.benchmarks.common import make_target_set

    return make_target_set(tmp_path_factory.mktemp("targets"), TINY, SMALL, num_samples=32, per_shard=8)


def test_sampling():
    r = _bench("sampling", "--repeats", "1", "--batch", "2", "--seq-len", "16", "--student-steps", "2", "4",
               "--teacher-steps", "8")
    _has_ratios(r, {f"student{n}_over_{b}" for n in (2, 4) for b in ("teacher_cached", "teacher_nocache", "ar")})
    assert r["nfe"]["teacher@8"] == 8 and 1 <= r["nfe"]["teacher@8+cache"] <= 8
    assert r["headline_teacher"] == "teacher_cached"


def test_targets():
    r = _bench("targets", "--repeats", "1", "--samples", "8", "targets.batch_size=4")
    _has_ratios(r, {"targets_over_bare", "targets_over_denoiser"})


def test_loader(target_set):
    r = _bench("loader", "--targets", str(target_set), "--repeats", "1", "--steps", "1", "--read-steps", "2",
               "--workers", "1", *SMALL)
    _has_ratios(r, {"loader_over_student", "read_decode_over_student", "workers_loader_over_student"})
    assert r["micro_batch"] == 4 and r["samples"] == 32


def test_train(target_set):
    r = _bench("train", "--targets", str(target_set), "--repeats", "1", "--steps", "1", "--warmup", "1", *SMALL,
               timeout=300)
    _has_ratios(r, {"zero1_over_ddp", "zero2_over_ddp", "zero3_over_ddp"})
    assert set(r["data_wait_frac"]) == {"ddp", "zero1", "zero2", "zero3"}


def test_storage():
    r = _bench("storage", "engine.global_batch_size=4", "distill.global_batch_size=4", "eval.batch_size=8",
               "--teacher-steps", "2", "--distill-steps", "1", "--eval-samples", "8", "--seeds", "2", "--k", "4",
               "--temperatures", "0.7")
    _has_ratios(r, {"topk4_rkl_quality_cost", "sampled4_fkl_quality_cost"})
    # Matched diversity: every student's NLL at the data's entropy, and the codes' cost there per seed.
    assert 2 < r["data_entropy"] < math.log(64)
    topk = r["quality"]["topk4/rkl"]
    assert len(topk["cost_at_data_entropy_per_seed"]) == 2 and math.isfinite(topk["nll_at_data_entropy"])
    assert r["bytes_per_position"]["topk4@V50257"] == 4 * (2 + 2) + 4  # uint16 id + fp16 log-prob, + log tail
