"""trainer/config.py: defaults <- YAML <- command line, and errors that name where and which key."""
from __future__ import annotations

import pytest

from tests.helpers import TINY
from trainer.config import ConfigError, RunConfig, load_config, save_config
from trainer.errors import BadInput


def _yaml(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_layers_apply_in_order_and_a_saved_config_reloads_equal(tmp_path):
    path = _yaml(tmp_path, "model:\n  d_model: 64\n  n_heads: 2\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.train.steps) == (64, 2, 9)  # YAML, then the command line
    assert cfg.optim.lr == RunConfig().optim.lr  # untouched keys keep their defaults
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_config_errors_are_bad_input():
    """A job's entry point turns them into one line and exit code 2 (trainer.jobs.common.entry)."""
    assert issubclass(ConfigError, BadInput) and issubclass(ConfigError, ValueError)


def test_unknown_key_in_a_file_names_the_file_and_the_key(tmp_path):
    path = _yaml(tmp_path, "model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "model.d_modle" in str(e.value)


def test_unknown_key_on_the_command_line_names_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.stepz=3"])
    assert "command line ('train.stepz=3')" in str(e.value) and "train.stepz" in str(e.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"command line \('train.steps=many'\).*train.steps"):
        load_config(None, ["train.steps=many"])


def test_bad_yaml_names_the_file(tmp_path):
    path = _yaml(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: cannot parse YAML"):
        load_config(path)


def test_top_level_list_is_refused_naming_the_file(tmp_path):
    path = _yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"command line: override 'train.steps' is not of the form key=value"):
        load_config(None, ["train.steps"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override,key", [
    ("model.n_heads=3", "model.n_heads"),  # does not divide d_model
    ("data.seq_len=4096", "data.seq_len"),  # longer than the model's context
    ("distill.divergence=rkl targets.codec=sampled", "distill.divergence"),  # sampled codes serve fkl only
    ("distill.streams=5", "distill.streams"),  # must divide the global batch
    ("optim.schedule=linear", "optim.schedule"),
])
def test_cross_field_checks_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, override.split())
    assert f"bad config key '{key}'" in str(e.value)


def test_config_diff_names_every_differing_key_sorted():
    from trainer.config import config_diff

    base = load_config(TINY)
    other = load_config(TINY, ["targets.codec=dense", "eval.temperatures=[0.8,1.0]"])
    assert config_diff(base, base) == []
    assert config_diff(base, other) == config_diff(other, base) == ["eval.temperatures", "targets.codec"]
