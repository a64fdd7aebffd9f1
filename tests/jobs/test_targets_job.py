"""trainer/jobs/targets.py end to end on the tiny config: 1 process vs 2 (torchrun, gloo) give the same
samples, a run killed with SIGKILL mid-shard resumes to the clean run's manifest, and bad input is
named. The teacher is a DiT with random weights, exported with trainer.runtime.checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, env, exit_code, random_teacher_run, run_job
from trainer.data.rows import RowPicker
from trainer.jobs import targets as job
from trainer.runtime.checkpoint import read_json
from trainer.targets import shards as SH

OVERRIDES = ["data.num_train_sequences=256", "data.num_valid_sequences=64", "targets.num_samples=40",
             "targets.samples_per_shard=8", "targets.batch_size=4", "targets.k=8"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A run folder with config.yaml, prepared data and a random-weight teacher export."""
    # At std 0.15 a masked position's prediction has ~2.9 nats of entropy, like a half-trained teacher.
    return random_teacher_run(tmp_path_factory.mktemp("base") / "run", OVERRIDES, std=0.15)


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def _main_in_process(monkeypatch, *args: str) -> int:
    """The job's main in this process (world size 1): faster than a subprocess."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return exit_code(job.main, list(args))
    finally:
        torch.set_num_threads(threads)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)


@pytest.fixture(scope="module")
def clean_run(base_run, tmp_path_factory):
    """One uninterrupted single-process run of round 1."""
    run = _copy(base_run, tmp_path_factory.mktemp("clean") / "run")
    mp = pytest.MonkeyPatch()
    try:
        assert _main_in_process(mp, "--run-dir", str(run), "--round", "1") == 0
    finally:
        mp.undo()
    return run


def _samples(out: Path) -> dict[int, dict]:
    manifest = SH.read_manifest(out)
    return {s["meta"]["index"]: s for sh in manifest["shards"] for s in SH.iter_samples(out / sh["name"])}


def test_clean_run_writes_a_complete_described_set(clean_run):
    out = clean_run / "round_1" / "targets"
    m = SH.read_manifest(out)
    assert SH.verify(out) == []
    export = read_json(clean_run / "teacher" / "export" / "export.json")
    assert m["teacher_sha256"] == export["files"]["ema.safetensors"]["sha256"] and m["teacher_weights"] == "ema"
    assert m["data_digest"] == read_json(clean_run / "data" / "data.json")["digest"]
    # tiny: start_steps 64 -> the round-1 student samples 32 steps, the teacher steps (1 - eps) / 64
    assert m["student_steps"] == 32 and m["dt"] == pytest.approx((1 - 1e-5) / 64)
    assert (m["codec"], m["k"], m["seq_len"], m["vocab_size"], m["tokenizer"]) == ("topk_is", 8, 64, 64, "synthetic")
    assert m["totals"]["samples"] == 40 and len(m["shards"]) == 5
    samples = _samples(out)
    assert sorted(samples) == list(range(40))
    for s in samples.values():
        assert s["meta"]["round"] == 1 and s["ids"].shape == (int((s["xt"] == 64).sum()), 8)
        assert 1e-3 <= s["meta"]["t"] <= 1
    assert not list(out.rglob("*.tmp"))
    tags = {json.loads(line)["tag"] for line in (clean_run / "metrics.jsonl").read_text().splitlines()}
    # one curve per round: round 2's rates do not continue round 1's
    assert {"targets/round_1/samples_per_s", "targets/round_1/mb_per_s", "targets/round_1/bytes_per_position"} <= tags


def test_two_processes_write_the_same_samples_as_one(clean_run, base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    run_job("trainer.jobs.targets", run, "--round", "1", nproc=2, config=None, timeout=300)
    one, two = clean_run / "round_1" / "targets", run / "round_1" / "targets"
    m1, m2 = SH.read_manifest(one), SH.read_manifest(two)
    assert {s["name"].split("-")[1] for s in m2["shards"]} == {"0000", "0001"}  # both ranks wrote
    strip = lambda m: [{k: v for k, v in s.items() if k != "name"} for s in m["shards"]]  # noqa: E731
    assert strip(m1) == strip(m2)  # same bytes, shard by shard (sha256): bitwise identical samples
    assert {k: v for k, v in m1.items() if k != "shards"} == {k: v for k, v in m2.items() if k != "shards"}
    s1, s2 = _samples(one), _samples(two)
    for i in range(40):
        assert s1[i]["meta"] == s2[i]["meta"]
        assert all(np.array_equal(s1[i][f], s2[i][f]) for f in ("xt", "ids", "logp", "logtail"))


def test_sigkill_mid_shard_then_rerun_matches_the_clean_run(clean_run, base_run, tmp_path, monkeypatch):
    run = _copy(base_run, tmp_path / "run")
    out = run / "round_1" / "targets"
    cmd = [sys.executable, "-m", "trainer.jobs.targets", "--run-dir", str(run), "--round", "1"]
    killed = subprocess.run(cmd, env={**env(), job.KILL_AFTER_ENV: "13"}, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    # shard 0 (samples 0-7) published, shard 1 half written under its temporary name, no manifest
    assert [p.name for p in out.glob("*.tar")] == ["targets-0000-000000.tar"]
    assert [p.name for p in out.glob(".*.tmp")] == [".targets-0000-000001.tar.tmp"]
    assert not (out / "manifest.json").exists()

    assert _main_in_process(monkeypatch, "--run-dir", str(run), "--round", "1") == 0
    assert (out / "manifest.json").read_bytes() == (clean_run / "round_1" / "targets" / "manifest.json").read_bytes()
    assert not list(run.rglob("*.tmp")) and SH.verify(out) == []
    # shard 0 was kept, not rewritten
    assert read_json(out / "progress" / "shard-000000.json")["sha256"] == SH.read_manifest(out)["shards"][0]["sha256"]


def test_bad_input_is_named(base_run, tmp_path, monkeypatch, capsys):
    run = _copy(base_run, tmp_path / "run")
    shutil.rmtree(run / "data")
    assert _main_in_process(monkeypatch, "--run-dir", str(run), "--round", "1") == 2
    assert f"no prepared data at {run / 'data'}" in capsys.readouterr().err

    run2 = _copy(base_run, tmp_path / "run2")
    assert _main_in_process(monkeypatch, "--run-dir", str(run2), "--round", "2") == 2
    assert f"no teacher export at {run2 / 'round_1' / 'student' / 'export'}" in capsys.readouterr().err
    assert _main_in_process(monkeypatch, "--run-dir", str(run2), "--round", "4") == 2
    assert "outside 1..distill.rounds=3" in capsys.readouterr().err

    # a second run into a folder made with other settings is refused, naming the field
    assert _main_in_process(monkeypatch, "--run-dir", str(run2), "--round", "1", "targets.num_samples=8") == 0
    capsys.readouterr()
    assert _main_in_process(monkeypatch, "--run-dir", str(run2), "--round", "1", "targets.num_samples=8",
                            "targets.k=4") == 2
    assert "k: stored 8, expected 4" in capsys.readouterr().err


def test_rows_are_a_permutation_per_pass():
    pick = RowPicker(10, seed=0, round_idx=1)
    first, second = [pick(i) for i in range(10)], [pick(i) for i in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert [RowPicker(10, 0, 2)(i) for i in range(10)] != first
