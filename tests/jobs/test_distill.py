"""trainer/jobs/distill.py for real: 2 CPU processes over gloo under torchrun, DeepSpeed ZeRO-2, the
round's targets written by the real targets job from a tiny random teacher (tests/jobs/test_reader.py
builds that run folder once per session)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from cluster.pipeline import free_port
from tests.helpers import (
    REPO,
    G,
    N,
    base_run,
    env,
    exit_code,
    read_tb_scalars,
    run_job,
    scalars,
    targets_in_process,
)
from trainer.config import load_config, round_steps
from trainer.data.rows import RowPicker
from trainer.distill.batches import Batch, distill_loss, online_targets
from trainer.distill.rounds import plan_init
from trainer.fileio import sha256_file
from trainer.jobs import distill as job
from trainer.layout import RunLayout
from trainer.method import divergences, sdtt
from trainer.method.sampling import make_denoiser
from trainer.model.dit import DiT
from trainer.runtime.checkpoint import load_model, read_json
from trainer.targets import shards as SH

STEPS = 24  # distill.steps_per_round of the base config (tests/jobs/test_reader.py)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _distill(run: Path, *args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    return run_job("trainer.jobs.distill", run, "--round", args[0] if args else "1", *args[1:], nproc=nproc,
                   config=None, check=check, timeout=300)


def _student(run: Path, r: int = 1) -> Path:
    return run / f"round_{r}" / "student"


def _consumed(run: Path, r: int = 1) -> dict[int, list[int]]:
    """step -> the indices of that step over all ranks (rank order = global batch order)."""
    out: dict[int, list[int]] = {}
    for path in sorted((_student(run, r) / "consumed").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(rec["indices"])
    return out


def _same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return base_run(tmp_path_factory)


@pytest.fixture(scope="module")
def round1(base, tmp_path_factory) -> Path:
    """One uninterrupted offline round 1 on 2 ranks, one DataLoader worker each."""
    run = _copy(base, tmp_path_factory.mktemp("round1") / "run")
    _distill(run, "1", "distill.loader_workers=1")
    return run


# --------------------------------------------------------------------------------------------------
# Offline round 1
# --------------------------------------------------------------------------------------------------
def test_round1_uses_every_sample_once_per_epoch_and_exports(round1):
    steps = _consumed(round1)
    assert sorted(steps) == list(range(STEPS)) and all(len(v) == G for v in steps.values())
    epoch = N // G
    first = sorted(i for k in range(epoch) for i in steps[k])
    assert first == list(range(N))  # epoch 0: every sample exactly once, across both ranks
    second = [i for k in range(epoch, STEPS) for i in steps[k]]
    assert len(set(second)) == len(second) == (STEPS - epoch) * G  # epoch 1 so far: no repeats
    summary = read_json(_student(round1) / "distill.json")
    assert summary["samples_consumed"] == STEPS * G and summary["skipped_shards"] == []
    assert summary["init"] == {"from": "export", "path": "teacher/export/ema.safetensors", "step": 0}
    manifest = SH.read_manifest(round1 / "round_1" / "targets")
    assert summary["teacher_sha256"] == manifest["teacher_sha256"] and summary["next_teacher_weights"] == "raw"
    raw, cfg = load_model(_student(round1) / "export", "raw")
    assert read_json(_student(round1) / "export" / "export.json")["step"] == STEPS
    assert cfg.distill.lr == 1e-3
    tb = read_tb_scalars(_student(round1) / "tb")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/data_wait_frac",
                "data/skipped_shards", "data/samples_consumed", "data/epoch", "eval/probe_loss", "sample/nll@32",
                "sample/entropy@32"):
        assert tag in tb, f"TensorBoard lacks {tag}: {sorted(tb)}"
    assert [s for s, _ in tb["train/loss"]] == list(range(4, STEPS + 1, 4))
    assert tb["data/samples_consumed"] == [(STEPS, float(STEPS * G))]
    lrs = [v for _, v in tb["train/lr"]]
    assert lrs[-1] == pytest.approx(1e-3)  # warmup (4 steps) then constant


def test_kill9_mid_round_then_restart_is_bit_identical(round1, base, tmp_path):
    """kill -9 every process of a running job after its step-8 checkpoint and a few more steps, then
    restart: same final weights and EMA, same samples (none twice, none skipped) as round1. This run
    reads in the training process (loader_workers=0) where round1 used a worker: the order is the same."""
    run = _copy(base, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "trainer.jobs.distill", "--run-dir", str(run), "--round", "1"]
    proc = subprocess.Popen(cmd, env={**env(), job.STEP_DELAY_ENV: "0.2"}, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log0 = _student(run) / "consumed" / "rank-0000.jsonl"
    try:
        deadline = time.time() + 120
        # past the step-8 checkpoint and two steps into the next interval
        while not (log0.exists() and '"step": 10,' in log0.read_text()):
            assert proc.poll() is None and time.time() < deadline, "the job ended before it could be killed"
            time.sleep(0.05)
    finally:
        # torchrun starts every rank in a session of its own: kill every process group of the tree
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for g in {os.getpgid(p.pid) for p in tree if p.is_running()}:
            os.killpg(g, signal.SIGKILL)
        proc.wait()
    assert (_student(run) / "checkpoints" / "latest").read_text().strip() in ("step_00000008", "step_00000016")
    assert not (_student(run) / "export").exists()
    assert max(_consumed(run)) >= 10  # steps past the checkpoint were taken, then lost

    _distill(run, "1")
    _same_weights(_student(run) / "export", _student(round1) / "export")
    assert _consumed(run) == _consumed(round1)  # the log keeps the training that counts: same samples
    assert read_json(_student(run) / "distill.json")["samples_consumed"] == STEPS * G
    client = read_json(_student(run) / "checkpoints" / "step_00000024" / "client_state.json")
    assert client["data"]["samples_consumed"] == STEPS * G and client["data"]["step"] == STEPS


# --------------------------------------------------------------------------------------------------
# Refusals before training
# --------------------------------------------------------------------------------------------------
def _main_in_process(*args: str) -> int:
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        return exit_code(job.main, list(args))
    finally:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)
        os.environ.update(saved)


def test_manifest_mismatch_and_bad_checksum_are_refused_before_training(base, tmp_path, capsys):
    run = _copy(base, tmp_path / "run")
    mpath = run / "round_1" / "targets" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    real_sha = manifest["teacher_sha256"]
    mpath.write_text(json.dumps(dict(manifest, teacher_sha256="ab" * 32)))  # targets of another teacher
    assert _main_in_process("--run-dir", str(run), "--round", "1") == 2
    err = capsys.readouterr().err
    assert "field 'teacher_sha256'" in err and "ab" * 32 in err and real_sha in err and "ema.safetensors" in err
    mpath.write_text(json.dumps(manifest))

    assert _main_in_process("--run-dir", str(run), "--round", "1", "data.seq_len=32") == 2
    assert "field 'seq_len': the target set has 64, the student expects 32 (data.seq_len)" in capsys.readouterr().err

    bad = manifest["shards"][2]["name"]
    with open(run / "round_1" / "targets" / bad, "r+b") as f:
        f.seek(1500)
        byte = f.read(1)
        f.seek(1500)
        f.write(bytes([byte[0] ^ 1]))
    assert _main_in_process("--run-dir", str(run), "--round", "1") == 2
    err = capsys.readouterr().err
    assert f"{run / 'round_1' / 'targets' / bad}: sha256" in err and "targets.verify=fail" in err
    assert not _student(run).exists()  # nothing trained, nothing written


def test_skip_policy_trains_on_the_rest_and_counts(base, tmp_path):
    run = _copy(base, tmp_path / "run")
    bad = SH.read_manifest(run / "round_1" / "targets")["shards"][1]["name"]  # samples 32..63
    (run / "round_1" / "targets" / bad).write_bytes(b"not a tar")
    _distill(run, "1", "targets.verify=skip", "distill.steps_per_round=14", nproc=1)
    seen = [i for v in _consumed(run).values() for i in v]
    assert len(seen) == 14 * G == len(set(seen)) == N - 32  # one epoch of the 224 good samples
    assert not any(32 <= i < 64 for i in seen)
    assert scalars(_student(run), "data/skipped_shards")[0] == (0, 1.0)
    assert read_json(_student(run) / "distill.json")["skipped_shards"][0][0] == bad


# --------------------------------------------------------------------------------------------------
# Online mode and the loss
# --------------------------------------------------------------------------------------------------
def test_online_mode_runs_on_the_same_samples_and_its_loss_falls(base, round1, tmp_path):
    run = _copy(base, tmp_path / "run")
    shutil.rmtree(run / "round_1" / "targets")  # online needs no target set
    # ZeRO-3 with an evaluation (sampling) in the middle of training: the sampler's inference_mode
    # must not leave inference tensors in the gathered parameters that the next backward refuses.
    _distill(run, "1", "distill.mode=online", "distill.steps_per_round=40", "engine.zero_stage=3",
             "train.eval_every=20")
    losses = [v for _, v in scalars(_student(run), "train/loss")]
    assert len(losses) == 10 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses
    assert [s for s, _ in scalars(_student(run), "eval/probe_loss")] == [20, 40]
    online = _consumed(run)
    offline = _consumed(round1)
    assert [online[k] for k in range(STEPS)] == [offline[k] for k in range(STEPS)]  # same indices, same order
    assert read_json(_student(run) / "distill.json")["targets"] == "online"


def test_online_examples_are_the_offline_examples_densely(base):
    """The teacher in the loop makes, for a sample index, the x_t and t the targets job stored and
    the distribution its top-K code approximates."""
    cfg = load_config(base / "config.yaml")
    tset = base / "round_1" / "targets"
    stored = {s["meta"]["index"]: s for s in SH.iter_samples(tset / SH.read_manifest(tset)["shards"][1]["name"])}
    teacher, _ = load_model(base / "teacher" / "export", "ema", cfg.model)
    steps = round_steps(cfg, 1)
    spec = sdtt.ExampleSpec(seed=cfg.seed, round_idx=1, dt=sdtt.teacher_dt(steps, 2, cfg.diffusion.sampling_eps),
                            teacher_steps=2, mask_id=64, noise_eps=cfg.diffusion.noise_eps,
                            train_eps=cfg.diffusion.train_eps, t_min=cfg.diffusion.sampling_eps, codec="dense", k=64)
    rows = RowPicker(512, cfg.seed, 1)
    train = np.load(base / "data" / "train.npy")
    idx = [33, 40, 57]
    x0 = torch.from_numpy(np.stack([train[rows(i)] for i in idx]).astype(np.int64))
    batch = online_targets(make_denoiser(teacher, 64, cfg.diffusion.noise_eps), Batch(idx, x0=x0), spec,
                               torch.device("cpu"))
    row = 0
    for b, i in enumerate(idx):
        s = stored[i]
        assert np.array_equal(batch.xt[b].numpy(), s["xt"]) and float(batch.t[b]) == s["meta"]["t"]
        m = s["ids"].shape[0]
        dense = batch.targets.logp[row:row + m]
        top = torch.gather(dense, 1, torch.from_numpy(s["ids"].astype(np.int64)))
        assert torch.allclose(top, torch.from_numpy(s["logp"].astype(np.float32)), atol=2e-2)
        row += m


def test_student_equal_to_its_teacher_with_one_teacher_step_has_zero_loss(base):
    cfg = load_config(base / "config.yaml")
    # Two instances of the same weights: a module first run under inference_mode caches rotary
    # tables that autograd then refuses (trainer/model/dit.py Rotary), and the job never shares one.
    teacher, _ = load_model(base / "teacher" / "export", "raw", cfg.model)
    student, _ = load_model(base / "teacher" / "export", "raw", cfg.model)
    denoise = make_denoiser(teacher, 64, 1e-3)
    spec = sdtt.ExampleSpec(seed=0, round_idx=1, dt=1 / 64, teacher_steps=1, mask_id=64, noise_eps=1e-3,
                            train_eps=1e-3, t_min=1e-5, codec="dense", k=64)
    x0 = torch.from_numpy(np.load(base / "data" / "train.npy")[:8].astype(np.int64))
    batch = online_targets(denoise, Batch(list(range(8)), x0=x0), spec, torch.device("cpu"))
    for kind in divergences.DIVERGENCES:
        assert abs(distill_loss(student, batch, cfg, kind).item()) < 1e-6, kind
    spec2 = dataclasses.replace(spec, teacher_steps=2)  # two steps: a real target
    batch2 = online_targets(denoise, Batch(list(range(8)), x0=x0), spec2, torch.device("cpu"))
    assert distill_loss(student, batch2, cfg, "rkl").item() > 0
    other = DiT(cfg.model)  # and a different student: a positive loss with a gradient
    loss = distill_loss(other, batch, cfg, "rkl")
    loss.backward()
    assert loss.item() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())


# --------------------------------------------------------------------------------------------------
# Round 2
# --------------------------------------------------------------------------------------------------
def test_round2_starts_from_round1_and_continues_its_step_count(round1, tmp_path):
    run = _copy(round1, tmp_path / "run")
    targets_in_process(run, 2)  # teacher: round 1's student, raw weights (distill.ema_as_teacher=false)
    m2 = SH.read_manifest(run / "round_2" / "targets")
    assert m2["teacher_weights"] == "raw"
    assert m2["teacher_sha256"] == sha256_file(_student(run) / "export" / "model.safetensors")
    _distill(run, "2")
    ckpt = _student(run, 2) / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{2 * STEPS:08d}"  # steps 24 -> 48
    client = read_json(ckpt / f"step_{2 * STEPS:08d}" / "client_state.json")
    assert client["round_start"] == STEPS and client["data"]["step"] == STEPS
    assert client["init"] == {"from": "checkpoint", "from_round": 1, "step": STEPS,
                              "path": "round_1/student/checkpoints/step_00000024"}
    lrs = scalars(_student(run, 2), "train/lr")
    assert lrs[0][0] == STEPS + 4 and all(v == pytest.approx(1e-3) for _, v in lrs)  # the warmup is not redone
    assert read_json(_student(run, 2) / "export" / "export.json")["step"] == 2 * STEPS
    summary = read_json(_student(run, 2) / "distill.json")
    assert summary["samples_consumed"] == STEPS * G and summary["teacher_weights"] == "raw"

    # With distill.reset_optimizer the round would start over from the teacher file instead.
    cfg = load_config(run / "config.yaml", ["distill.reset_optimizer=true"])
    init = plan_init(cfg, RunLayout(run), 3, _student(run, 2) / "export" / "model.safetensors")
    assert (init.kind, init.round_start) == ("export", 0)
    init = plan_init(load_config(run / "config.yaml"), RunLayout(run), 3,
                     _student(run, 2) / "export" / "model.safetensors")
    assert (init.kind, init.round_start) == ("continue", 2 * STEPS)
