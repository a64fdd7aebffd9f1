"""The AR stage: ``trainer.jobs.pretrain --ar`` trains the same-size causal DiT with next-token loss on
the same engine (DeepSpeed ZeRO, 2 CPU processes) and exports it to <run>/ar/export."""
import json
import math

import numpy as np
import pytest
import torch

from tests.helpers import FAST, read_tb_scalars, run_job, scalars
from trainer.data.prepared import load_split
from trainer.method.autoregressive import nll_per_token, shift_right
from trainer.runtime.checkpoint import load_model

STEPS = ["train.steps=80", "train.eval_every=40", "train.ckpt_every=40", "optim.warmup_steps=10"]
UNIFORM = math.log(64)


@pytest.mark.parametrize("stage", [2, 3])
def test_ar_stage_learns_and_exports_a_causal_model(tmp_path, stage):
    run = tmp_path / "run"
    run_job("trainer.jobs.pretrain", run, "--ar", *FAST, *STEPS, f"engine.zero_stage={stage}")
    assert not (run / "teacher").exists()
    val = [v for _, v in read_tb_scalars(run / "ar" / "tb")["val/nll"]]
    assert len(val) == 2 and val[1] < val[0] < UNIFORM - 0.1, val
    model, cfg = load_model(run / "ar" / "export", "ema", causal=True)
    # The export is a causal model: its NLL from an independent forward matches what the job logged
    # (the job's value is of the raw weights at the last evaluation; the EMA is close but not equal).
    valid = torch.from_numpy(np.asarray(load_split(run / "data", "valid"), dtype=np.int64))
    raw, _ = load_model(run / "ar" / "export", "raw", causal=True)
    with torch.no_grad():
        nll = float(nll_per_token(raw(shift_right(valid, 64)), valid, 64).mean())
    # train.eval_batches=2 batches of 32 rows (FAST) cover the 64 validation rows exactly once.
    assert abs(val[-1] - nll) < 1e-4, (val[-1], nll)
    info = json.loads((run / "data" / "data.json").read_text())
    assert info["entropy_rate"] - 0.1 < nll < UNIFORM - 0.1  # between the truth and a uniform guess
    # Changing a later token does not change an earlier prediction: it is causal.
    x = valid[:2].clone()
    with torch.no_grad():
        a = model(shift_right(x, 64))
        x[:, 10] = (x[:, 10] + 1) % 64
        b = model(shift_right(x, 64))
    assert torch.equal(a[:, :11], b[:, :11]) and not torch.equal(a[:, 11:], b[:, 11:])
    assert len(scalars(run / "ar", "train/loss")) == 16
