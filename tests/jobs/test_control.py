"""The control matched per round, for real (DeepSpeed ZeRO over gloo): exported after every round's
update count with the students' per-round learning rates, and evaluated as control@r."""
import json

import pytest

from tests.helpers import FAST, run_job, scalars
from trainer.config import load_config
from trainer.layout import RunLayout
from trainer.runtime.lr import lr_at

SPR, ROUNDS, WARMUP, LR = 20, 2, 4, 1e-3
DISTILL = [f"distill.rounds={ROUNDS}", "distill.start_steps=16", f"distill.steps_per_round={SPR}",
           f"distill.warmup_steps={WARMUP}", f"distill.lr={LR}", "distill.control=true", "optim.schedule=cosine",
           "train.log_every=1", "train.eval_every=1000", "train.ckpt_every=1000"]


def students_rate(step: int) -> float:
    """Round r's engine (trainer/jobs/distill.py): total = round_start + steps_per_round, one decay."""
    round_start = (step // SPR) * SPR
    return lr_at(step, LR, WARMUP, round_start + SPR, "cosine", 0.1)


@pytest.mark.slow
def test_control_is_exported_per_round_with_the_students_rates_and_evaluated_as_control_at_r(tmp_path):
    run = tmp_path / "run"
    run_job("trainer.jobs.pretrain", run, *FAST, *DISTILL, "train.steps=30", nproc=1)
    run_job("trainer.jobs.pretrain", run, *FAST, *DISTILL, "train.steps=30", "--control", nproc=2)
    layout = RunLayout(run)
    exports = {r: json.loads((layout.control_export(r, ROUNDS) / "export.json").read_text()) for r in (1, 2)}
    assert layout.control_export(1, ROUNDS) != layout.control_export(2, ROUNDS)
    assert [exports[r]["step"] for r in (1, 2)] == [SPR, 2 * SPR]
    # train/lr is logged after each update k + 1 with the rate of update k: the students' rates, which
    # jump back up at the round boundary (one smooth decay over 2 x SPR would not).
    lrs = dict(scalars(layout.model_dir("control"), "train/lr"))
    assert len(lrs) == ROUNDS * SPR
    for done, lr in lrs.items():
        assert lr == pytest.approx(students_rate(done - 1), rel=1e-6), done
    assert lrs[SPR + 1] > lrs[SPR] * 2
    cfg = load_config(run / "config.yaml")
    assert cfg.distill.steps_per_round == SPR
    # control@1: evaluated into its own folder as the control of round 1, at round 1's count only.
    run_job("trainer.jobs.evaluate", run, "--round", "1", "--control", *FAST, *DISTILL,
            "eval.steps=[8]", "eval.temperatures=[0.9,1.0]", nproc=1)
    ev = json.loads((layout.control_eval(1, ROUNDS) / "metrics.json").read_text())
    assert ev["model"] == "control" and ev["round"] == 1
    assert sorted({(r["steps"], r["temperature"]) for r in ev["rows"]}) == [(8, 0.9), (8, 1.0)]
    assert not (layout.eval("control") / "metrics.json").exists()  # the whole-budget control's is separate
