"""The optional AR stage in the chain (cluster/pipeline.py) and the config rules around it."""
from pathlib import Path

import pytest

from cluster import pipeline
from tests.helpers import TINY
from trainer.config import ConfigError, load_config
from trainer.layout import AR, RunLayout


def test_ar_stage_is_off_by_default():
    assert "ar" not in [s.name for s in pipeline.build_chain(load_config(TINY))]


def test_ar_stage_feeds_the_evaluations_when_it_is_the_judge():
    stages = {s.name: s for s in pipeline.build_chain(load_config(TINY, ["teacher.train_ar=true", "eval.judge=ar"]))}
    names = list(stages)
    assert stages["ar"].args == ("--ar",) and stages["ar"].depends == ("prepare",)
    assert stages["ar"].module == "trainer.jobs.pretrain" and stages["ar"].product == "ar/export/export.json"
    assert stages["ar"].product == str(RunLayout(Path()).export_manifest(AR))  # the layout's AR model
    assert names.index("ar") < names.index("eval_0")  # the local runner goes in list order
    for name, st in stages.items():
        assert ("ar" in st.depends) == (st.module == "trainer.jobs.evaluate"), name
    # An AR stage but another judge: the evaluations do not wait for it.
    other = pipeline.build_chain(load_config(TINY, ["teacher.train_ar=true"]))
    assert not any("ar" in s.depends for s in other if s.name != "ar")
    elsewhere = pipeline.build_chain(load_config(TINY, ["teacher.train_ar=true", "eval.judge=ar",
                                                          "eval.ar_path=/elsewhere/export"]))
    assert not any("ar" in s.depends for s in elsewhere if s.name != "ar")


def test_ar_and_control_together_are_bad_input_before_anything_is_written(tmp_path):
    """pretrain trains one model: --ar with --control is one BadInput line (exit 2), and the run folder
    gets nothing, not even its config.yaml."""
    from trainer.errors import BadInput
    from trainer.jobs import pretrain

    run = tmp_path / "run"
    with pytest.raises(BadInput, match="--ar and --control"):
        pretrain.main(["--run-dir", str(run), "--config", str(TINY), "--ar", "--control"])
    assert not run.exists()


def test_ar_judge_needs_a_model():
    with pytest.raises(ConfigError, match="teacher.train_ar"):
        load_config(TINY, ["eval.judge=ar"])
    load_config(TINY, ["eval.judge=ar", "eval.ar_path=/some/ar/export"])
