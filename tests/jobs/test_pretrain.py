"""The teacher pretraining job, for real: DeepSpeed ZeRO with 2 CPU processes over gloo."""
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import FAST, read_tb_scalars, run_job, scalars
from trainer.layout import EXIT_PREEMPTED
from trainer.runtime.checkpoint import load_exported


def stopped_early(proc) -> bool:
    """The job exited with EXIT_PREEMPTED (torchrun reports the rank's code and exits 1)."""
    reported = proc.returncode != 0 and f"exitcode  : {EXIT_PREEMPTED}" in proc.stderr
    return proc.returncode == EXIT_PREEMPTED or reported


STEPS = ["train.steps=80", "train.eval_every=40", "train.ckpt_every=40", "optim.warmup_steps=10"]
UNTRAINED_NLL = math.log(64)  # a uniform prediction: E[w(t) * masked fraction] * log V = log V


@pytest.mark.parametrize("stage", [2, 3])
def test_pretrain_loss_falls_and_exports(tmp_path, stage):
    run = tmp_path / "run"
    run_job("trainer.jobs.pretrain", run, *FAST, *STEPS, f"engine.zero_stage={stage}")
    losses = [v for _, v in scalars(run, "train/loss")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < UNTRAINED_NLL - 0.15, losses  # the ELBO is noisy: average a few
    val = [v for _, v in scalars(run, "val/nll")]  # fixed noise: comparable across evaluations
    assert len(val) == 2 and val[1] < val[0] < UNTRAINED_NLL - 0.1, val
    # The export is what later stages load: verified weights of the right shape.
    raw, cfg = load_exported(run / "teacher" / "export", "raw")
    ema, _ = load_exported(run / "teacher" / "export", "ema", expect_model=cfg.model)
    assert cfg.engine.zero_stage == stage and set(raw) == set(ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the EMA is a different average
    if stage == 2:
        tb = read_tb_scalars(run / "tb")
        for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/data_wait_frac",
                    "val/nll", "sample/nll@16", "sample/entropy@16"):
            assert tag in tb, f"TensorBoard lacks {tag}: {sorted(tb)}"
        assert [s for s, _ in tb["train/loss"]] == list(range(5, 81, 5))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*FAST, "train.steps=30", "train.eval_every=15", "train.ckpt_every=15", "optim.warmup_steps=5"]
    run_job("trainer.jobs.pretrain", straight, *args)
    first = run_job("trainer.jobs.pretrain", resumed, *args, "train.stop_after=10", check=False)
    assert stopped_early(first), first.stderr[-3000:]
    assert not (resumed / "teacher" / "export").exists()
    run_job("trainer.jobs.pretrain", resumed, *args)
    assert scalars(straight, "train/loss") == scalars(resumed, "train/loss")
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(straight / "teacher" / "export" / name)
        b = load_file(resumed / "teacher" / "export" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_on_a_different_world_size(tmp_path):
    """ZeRO-3 on 2 ranks, stopped, resumed on 1 rank through a universal checkpoint. The engine
    checks the loaded weights against the checkpoint (load_module_only restores nothing silently
    under ZeRO-3); here we check training then really continued from them."""
    run = tmp_path / "run"
    args = [*FAST, "train.steps=30", "train.eval_every=100", "train.ckpt_every=100", "optim.warmup_steps=5",
            "engine.zero_stage=3"]
    first = run_job("trainer.jobs.pretrain", run, *args, "train.stop_after=20", check=False)
    assert stopped_early(first), first.stderr[-3000:]
    loss_at_20 = scalars(run, "train/loss")[-1]
    run_job("trainer.jobs.pretrain", run, *args, nproc=1)
    losses = scalars(run, "train/loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30]
    assert loss_at_20 == losses[3]
    assert losses[-1][1] < 4.0  # a fresh model sits near log(64) = 4.16; the resumed one kept learning
    _, cfg = load_exported(run / "teacher" / "export", "raw")


def test_bad_config_is_refused_before_training(tmp_path):
    proc = run_job("trainer.jobs.pretrain", tmp_path / "run", "model.n_heads=3", nproc=1, check=False)
    assert proc.returncode != 0
    assert "model.n_heads" in proc.stderr
    proc = run_job("trainer.jobs.pretrain", tmp_path / "run2", "engine.global_batch_size=33", check=False)
    assert proc.returncode != 0 and "engine.global_batch_size" in proc.stderr
