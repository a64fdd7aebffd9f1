"""The optional AR stage in the chain (cluster/pipeline.py) and the config rules around it."""
import pytest

from cluster import pipeline
from tests.helpers import TINY
from trainer.config import ConfigError, load_config


def test_ar_stage_is_off_by_default():
    assert "ar" not in [s.name for s in pipeline.build_chain(load_config(TINY))]


def test_ar_stage_feeds_the_evaluations_when_it_is_the_judge():
    stages = {s.name: s for s in pipeline.build_chain(load_config(TINY, ["teacher.train_ar=true", "eval.judge=ar"]))}
    names = list(stages)
    assert stages["ar"].args == ("--ar",) and stages["ar"].depends == ("prepare",)
    assert stages["ar"].module == "trainer.jobs.pretrain" and stages["ar"].product == "ar/export/export.json"
    assert names.index("ar") < names.index("eval_0")  # the local runner goes in list order
    for name, st in stages.items():
        assert ("ar" in st.depends) == (st.module == "trainer.jobs.evaluate"), name
    # An AR stage but another judge: the evaluations do not wait for it.
    other = pipeline.build_chain(load_config(TINY, ["teacher.train_ar=true"]))
    assert not any("ar" in s.depends for s in other if s.name != "ar")


def test_ar_judge_needs_a_model():
    with pytest.raises(ConfigError, match="teacher.train_ar"):
        load_config(TINY, ["eval.judge=ar"])
    load_config(TINY, ["eval.judge=ar", "eval.ar_path=/some/ar/export"])
