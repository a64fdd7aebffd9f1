"""trainer/layout.py: the run folder's paths, the pipeline's products and the model names."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.pipeline import build_chain
from tests.helpers import TINY
from trainer.config import load_config
from trainer.layout import AR, CONTROL, EXIT_PREEMPTED, RunLayout


def test_model_folders_exports_and_evaluations():
    at = RunLayout(Path("/run"))
    assert at.export(0) == Path("/run/teacher/export") and at.eval(0) == Path("/run/teacher/eval")
    assert at.export(2) == Path("/run/round_2/student/export") and at.eval(2) == Path("/run/round_2/eval")
    assert at.checkpoints(2) == Path("/run/round_2/student/checkpoints")
    assert at.export(CONTROL) == Path("/run/control/export") and at.eval(CONTROL) == Path("/run/control/eval")
    assert at.targets(3) == Path("/run/round_3/targets")
    # the teacher's metrics stay in the run folder, a student's and the control's in their own
    assert at.metrics(0) == Path("/run") and at.metrics(1) == Path("/run/round_1/student")
    assert at.metrics(CONTROL) == Path("/run/control")
    # the AR model (pretrain --ar): its checkpoints, export and metrics in <run>/ar, and no evaluation
    assert at.checkpoints(AR) == Path("/run/ar/checkpoints") and at.export(AR) == Path("/run/ar/export")
    assert at.metrics(AR) == Path("/run/ar")
    assert at.control_eval_metrics(1, 2) == Path("/run/control/round_1/eval/metrics.json")
    with pytest.raises(ValueError, match="no evaluation folder"):
        at.eval(AR)


def test_round_r_distils_from_model_r_minus_1():
    assert [RunLayout.teacher_of(r) for r in (1, 2, 5)] == [0, 1, 4]
    with pytest.raises(ValueError, match="1-based"):
        RunLayout.teacher_of(0)


@pytest.mark.parametrize("bad", [-1, "student", 1.0, True])
def test_not_a_model_is_refused(bad):
    with pytest.raises(ValueError, match="not a model"):
        RunLayout(Path("/run")).export(bad)


def test_rel_is_run_relative_where_possible():
    at = RunLayout(Path("/run"))
    assert at.rel(at.export(0) / "ema.safetensors") == "teacher/export/ema.safetensors"
    assert at.rel(Path("/elsewhere/x")) == "/elsewhere/x"


def test_pipeline_products_are_the_layouts():
    cfg = load_config(TINY, ["distill.control=true"])
    at = RunLayout(Path())
    products = {s.name: s.product for s in build_chain(cfg)}
    assert products["prepare"] == "data/data.json" == str(at.data_info)
    assert products["teacher"] == "teacher/export/export.json" == str(at.export_manifest(0))
    assert products["targets_2"] == "round_2/targets/manifest.json"
    assert products["distill_2"] == "round_2/student/export/export.json"
    assert products["eval_0"] == "teacher/eval/metrics.json" and products["eval_2"] == "round_2/eval/metrics.json"
    assert products["control"] == "control/export/export.json"
    assert products["eval_control"] == "control/eval/metrics.json" and products["report"] == "report.json"


def test_the_preemption_code_is_one_constant():
    import cluster.stage_job

    assert cluster.stage_job.EXIT_PREEMPTED is EXIT_PREEMPTED == 75
