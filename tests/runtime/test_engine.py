"""trainer/runtime/lr.py, trainer/runtime/dist.py and trainer/runtime/engine.py.

The engine tests run real DeepSpeed ZeRO over gloo with 2 CPU processes (tests/workers/ds_worker.py).
Three launches cover everything, in order (later ones read the checkpoints earlier ones wrote):
  source  2 ranks: ZeRO-2 uninterrupted run A; ZeRO-2 run B stopped at step 3 with checkpoints and
          an interrupted save left behind; ZeRO-3 run C with a checkpoint at step 3
  resume  2 ranks: B resumed from `latest` and finished
  cross   1 rank (plain python, no launcher): B's and C's checkpoints loaded at world size 1
          (universal conversion + weight check), then every refusal case
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.pipeline import free_port
from trainer.config import ConfigError, EngineConfig, OptimConfig, RunConfig, TrainSetup, distill_setup, pretrain_setup
from trainer.runtime.dist import read_env
from trainer.runtime.lr import lr_at

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "workers" / "ds_worker.py"
HALF, STEPS = 3, 6


# --------------------------------------------------------------------------------------------------
# lr schedule (pure)
# --------------------------------------------------------------------------------------------------
def test_lr_warmup_is_linear_and_never_zero():
    lrs = [lr_at(s, 1.0, 4, 100) for s in range(6)]
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_lr_constant_without_warmup():
    assert all(lr_at(s, 3e-4, 0, 10) == 3e-4 for s in range(20))


def test_lr_cosine_decays_to_floor_and_stays():
    base, warm, total, ratio = 2.0, 10, 110, 0.1
    lrs = [lr_at(s, base, warm, total, "cosine", ratio) for s in range(200)]
    assert lrs[warm] == pytest.approx(base)
    assert lrs[warm + 50] == pytest.approx(base * (ratio + (1 - ratio) * 0.5))
    assert lrs[total] == pytest.approx(base * ratio) and lrs[199] == pytest.approx(base * ratio)
    decay = lrs[warm:total + 1]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_lr_rejects_bad_input():
    with pytest.raises(ValueError, match="linear"):
        lr_at(0, 1.0, 0, 10, "linear")
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 1.0, 0, 10)


# --------------------------------------------------------------------------------------------------
# env reading (pure)
# --------------------------------------------------------------------------------------------------
def test_env_torchrun_and_single():
    r = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                  "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (r.rank, r.local_rank, r.world_size, r.local_world_size, r.source) == (3, 1, 8, 4, "torchrun")
    # SLURM's variables are read by the job wrapper (cluster/stage_job.py task_rendezvous), not here: the
    # batch script (SLURM_PROCID=0, the job's SLURM_NTASKS, no step) and a one-task step are one process.
    r = read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"})
    assert (r.rank, r.world_size, r.source) == (0, 1, "single")
    r = read_env({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"})
    assert (r.rank, r.world_size, r.source) == (0, 1, "single")
    r = read_env({})
    assert (r.rank, r.world_size, r.source) == (0, 1, "single")


def test_env_errors_name_the_variable():
    with pytest.raises(ValueError, match="MASTER_PORT"):
        read_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "n1"})
    with pytest.raises(ValueError, match="RANK"):
        read_env({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="outside"):
        read_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    # srun starting several tasks straight into a job would train N copies alone: refused.
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS.*tools/submit.py or torchrun"):
        read_env({"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"})


# --------------------------------------------------------------------------------------------------
# DeepSpeed config (in-process: importing trainer.runtime.engine imports deepspeed)
# --------------------------------------------------------------------------------------------------
def test_ds_config_geometry_and_errors():
    from trainer.runtime.engine import ds_config

    cfg = ds_config(TrainSetup(OptimConfig(grad_clip=0.5), 32), EngineConfig(zero_stage=3, micro_batch_size=4), 2)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 4)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["bf16"]["enabled"] is torch.cuda.is_available()
    with pytest.raises(ConfigError, match="engine.global_batch_size"):
        ds_config(TrainSetup(OptimConfig(), 30), EngineConfig(), 4)
    with pytest.raises(ConfigError, match="engine.micro_batch_size"):
        ds_config(TrainSetup(OptimConfig(), 32), EngineConfig(micro_batch_size=3), 2)
    with pytest.raises(ConfigError, match="distill.global_batch_size"):
        ds_config(TrainSetup(OptimConfig(), 16, key="distill"), EngineConfig(), 3)
    # each stage's own settings reach DeepSpeed: distillation's lr and weight decay, not optim's
    params = ds_config(distill_setup(RunConfig()), EngineConfig(), 2)["optimizer"]["params"]
    assert params["lr"] == RunConfig().distill.lr != RunConfig().optim.lr
    pretrain = ds_config(pretrain_setup(RunConfig()), EngineConfig(), 2)["optimizer"]["params"]
    assert pretrain["lr"] == RunConfig().optim.lr


# --------------------------------------------------------------------------------------------------
# Real DeepSpeed runs
# --------------------------------------------------------------------------------------------------
def _launch(out: Path, scenario: str, nproc: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), scenario]  # exercises the no-launcher path
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(out), scenario]
    t = time.perf_counter()
    log = out / f"{scenario}.log"
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    wall = time.perf_counter() - t
    result = out / f"{scenario}.pt"
    tail = log.read_text()[-4000:]
    assert result.is_file(), f"{scenario}: no result file; log tail:\n{tail}"
    res = torch.load(result, weights_only=False)  # our own test output
    assert res["ok"], f"{scenario} failed:\n{res.get('error')}\nlog tail:\n{tail}"
    res["wall_s"] = wall
    print(f"[{scenario}] launch {wall:.1f}s, scenario {res['scenario_s']:.1f}s")
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    res = {"out": out, "source": _launch(out, "source", 2)}
    res["resume"] = _launch(out, "resume", 2)
    res["cross"] = _launch(out, "cross", 1)
    return res


def _losses(stats):
    return [s["loss"] for s in stats]


def _assert_equal_sd(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: '{k}' differs (max {(a[k] - b[k]).abs().max().item():.3g})"


def test_zero2_and_zero3_train_and_loss_falls(runs):
    src = runs["source"]
    for name in ("A_stats", "C_stats"):
        losses = _losses(src[name])
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0] - 0.3, f"{name}: loss did not fall: {losses}"
        assert all(math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in src[name])
    assert src["bcast"] == {"from": 0} and src["mean_rank"] == 0.5  # rank helpers over gloo
    assert src["geometry"] == (2, 2)  # global 8 over 2 ranks, micro 2: 2 accumulation steps
    # ZeRO-3 (partitioned parameters, replicated EMA via gathering) computes what ZeRO-2 does.
    assert _losses(src["C_stats"]) == pytest.approx(_losses(src["A_stats"]), rel=1e-5)
    for k, v in src["A"]["ema"].items():
        torch.testing.assert_close(src["C"]["ema"][k], v, rtol=1e-5, atol=1e-6)
    # the schedule drove the optimizer: warmup 2 steps then cosine
    assert [s["lr"] for s in src["A_stats"][:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])


def test_resume_same_world_size_is_bit_identical(runs):
    a, r = runs["source"], runs["resume"]
    assert r["resumed_step"] == HALF
    assert r["client"] == {"step": 3, "data_pos": 24, "pi": 3.141592653589793}
    assert _losses(a["B_stats"]) == _losses(a["A_stats"])[:HALF]
    assert _losses(r["stats"]) == _losses(a["A_stats"])[HALF:]  # exact float equality
    assert [s["grad_norm"] for s in r["stats"]] == [s["grad_norm"] for s in a["A_stats"]][HALF:]
    for part in ("master", "module", "ema"):
        _assert_equal_sd(r["final"][part], a["A"][part], f"resumed vs uninterrupted {part}")


def test_interrupted_save_and_retention(runs):
    a = runs["source"]
    # keep=2 removed step_0001; the interrupted save of step 4 (a .tmp dir) was ignored by the
    # resume, which loaded step 3 (previous test) from `latest`.
    assert [n for n in a["B_listing"] if n.startswith("step_")] == ["step_0002", "step_0003"]
    root = runs["out"] / "ckpt_z2"
    assert (root / "latest").read_text().strip() == "step_0003"
    assert (root / ".tmp-step_0004").is_dir() and runs["resume"]["resumed_step"] == HALF


def test_resume_on_another_world_size(runs):
    a, c = runs["source"], runs["cross"]
    assert c["world_size"] == 1 and c["z2_geometry"] == (2, 4)
    # weights after the universal load are exactly the checkpoint's consolidated fp32 weights
    _assert_equal_sd(c["z2_loaded"]["master"], c["z2_ckpt_fp32"], "ZeRO-2 2->1 loaded vs consolidated")
    _assert_equal_sd(c["z2_loaded"]["master"], a["B"]["master"], "ZeRO-2 2->1 loaded vs saved")
    _assert_equal_sd(c["z2_loaded"]["ema"], a["B"]["ema"], "ZeRO-2 2->1 EMA")
    assert c["z2_client"]["step"] == 3
    # optimizer state came along: training continues as the 2-rank run did (up to summation order)
    assert _losses(c["z2_stats"]) == pytest.approx(_losses(a["A_stats"])[HALF:], rel=1e-5)
    # ZeRO-3: the trap case (load_module_only restores nothing) is checked by the engine itself
    for part in ("master", "module", "ema"):
        _assert_equal_sd(c["z3_loaded"][part], a["C_half"][part], f"ZeRO-3 2->1 {part}")
    assert _losses(c["z3_stats"]) == pytest.approx(_losses(a["C_stats"])[HALF:], rel=1e-5)
    assert (runs["out"] / "ckpt_z2" / "step_0003.universal").is_dir()


def test_bad_checkpoints_are_refused_naming_the_file(runs):
    c = runs["cross"]
    optim, shard = c["files"]["optim"], c["files"]["shard"]
    assert "CheckpointError" in c["err_corrupt"] and f"bad_flip/step_0003/{optim}" in c["err_corrupt"] \
        and "sha256" in c["err_corrupt"]
    assert f"bad_trunc/step_0003/{shard}" in c["err_truncated"] and "truncated" in c["err_truncated"]
    assert "bad_meta/step_0003/engine_meta.json" in c["err_meta"] and "corrupt JSON" in c["err_meta"]
    assert "bad_latest/step_9999" in c["err_latest"] and "missing" in c["err_latest"]
    assert "engine_meta.json" in c["err_model_cfg"] and "model.d_model: stored 128, expected 256" in c["err_model_cfg"]
    assert "engine_meta.json" in c["err_shape"] and "'emb.weight'" in c["err_shape"] \
        and "[512, 256]" in c["err_shape"] and "[512, 128]" in c["err_shape"]
    assert "engine.zero_stage=2, this run uses 3" in c["err_stage"]
