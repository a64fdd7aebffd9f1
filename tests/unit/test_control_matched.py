"""The control matched per round: its learning rates are the students' round by round (hence equal
lr integrals at every round's update count), the pipeline evaluates control@r, and the report
compares round r with control@r."""
from __future__ import annotations

import numpy as np
import pytest

from cluster import pipeline
from tests.helpers import TINY
from trainer.config import distill_setup, load_config
from trainer.distill.control import round_ends
from trainer.evaluation import compare
from trainer.runtime.engine import Schedule
from trainer.runtime.lr import lr_at, segment_total


def test_segment_total_is_the_end_of_the_segment_holding_the_step():
    assert [segment_total(k, 400, 800) for k in (0, 399, 400, 799, 900)] == [400, 400, 800, 800, 800]
    assert segment_total(123, 0, 800) == 800


def test_the_controls_rates_are_the_students_round_by_round():
    """tiny-regime: 2 rounds of 400 updates, distill.lr 3e-4, 20 warm-up steps, cosine. Each round's
    student engine decays over [round_start, round_start + 400) (trainer/jobs/distill.py); the control,
    one engine over 800 updates with distill_setup's segment, must give the same rate at every step."""
    cfg = load_config("configs/tiny-regime.yaml")
    setup = distill_setup(cfg)
    assert setup.schedule_segment == 400 and round_ends(cfg) == [400, 800]
    control = Schedule(setup.optim.lr, setup.optim.warmup_steps, 800, "cosine", setup.optim.min_lr_ratio,
                       setup.schedule_segment)
    students = [Schedule(3e-4, 20, start + 400, "cosine", 0.1)(k)
                for start in (0, 400) for k in range(start, start + 400)]
    ctrl = [control(k) for k in range(800)]
    assert ctrl == students
    # The review's numbers: round 1 sums to 0.0660, rounds 1 + 2 to 0.0986; one smooth decay to 0.132.
    assert sum(ctrl[:400]) == pytest.approx(0.0660, abs=5e-4) and sum(ctrl) == pytest.approx(0.0986, abs=5e-4)
    smooth = [lr_at(k, 3e-4, 20, 800, "cosine", 0.1) for k in range(800)]
    assert sum(smooth) == pytest.approx(0.132, abs=1e-3)
    assert ctrl[400] / ctrl[399] > 5  # the jump at the round boundary: 3.0e-5 -> 1.7e-4


def test_the_pipeline_evaluates_the_control_after_every_round():
    cfg = load_config(TINY, ["distill.control=true"])  # 3 rounds
    stages = {s.name: s for s in pipeline.build_chain(cfg)}
    assert stages["eval_control_1"].args == ("--round", "1", "--control")
    assert stages["eval_control_2"].product == "control/round_2/eval/metrics.json"
    assert "eval_control_3" not in stages and stages["eval_control"].product == "control/eval/metrics.json"
    assert {"eval_control", "eval_control_1", "eval_control_2"} <= set(stages["report"].depends)


def _row(model, rnd, steps, level, n=16):
    return {"model": model, "round": rnd, "steps": steps, "temperature": 1.0,
            "nll_per_sample": list(np.full(n, level) + np.linspace(0, 0.1, n)), "entropy_per_sample": [2.0] * n,
            "entropy": 2.0}


def test_round_r_is_compared_with_control_at_r_when_it_was_evaluated():
    rows = [_row("teacher", 0, 8, 1.5), _row("teacher", 0, 4, 2.2), _row("student", 1, 8, 1.4),
            _row("student", 2, 4, 2.0), _row("control", 2, 8, 1.45), _row("control", 2, 4, 2.1)]
    old = compare.compare_all(rows, {1: 8, 2: 4}, None, 2)
    assert old[0]["control_round"] == 2 and old[0]["control_matched"] is False
    assert old[0]["control_nll"]["value"] == pytest.approx(1.5)
    matched = compare.compare_all(rows + [_row("control", 1, 8, 1.48)], {1: 8, 2: 4}, None, 2)
    assert matched[0]["control_round"] == 1 and matched[0]["control_matched"] is True
    assert matched[0]["student_minus_control"]["value"] == pytest.approx(1.4 - 1.48)
    assert matched[1]["control_round"] == 2 and matched[1]["control_matched"] is True
