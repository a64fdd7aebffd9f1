"""The choice lists declared once in trainer/config.py (Codec, Divergence, PAIRS, Schedule,
VerifyPolicy): the modules that implement them serve exactly those names, a bad value is refused
naming the key, and the typed choices leave the resolved config.yaml as plain strings."""
from __future__ import annotations

import pytest

from tests.helpers import REPO
from trainer.config import (
    PAIRS,
    Codec,
    ConfigError,
    Divergence,
    Schedule,
    VerifyPolicy,
    choice_names,
    load_config,
    save_config,
    to_yaml,
)
from trainer.method import divergences
from trainer.runtime import lr

TINY = REPO / "configs" / "tiny.yaml"


def test_every_codec_has_a_pairing_and_the_divergences_serve_exactly_the_declared_names():
    assert set(PAIRS) == set(Codec)
    assert divergences.DIVERGENCES == ("rkl", "fkl", "mse", "tvd") == choice_names(Divergence)
    assert divergences.SUPPORTED == {"topk": divergences.DIVERGENCES, "topk_is": ("rkl", "fkl"),
                                     "sampled": ("fkl",), "dense": divergences.DIVERGENCES}


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("divergence", list(Divergence))
def test_config_validation_and_the_divergences_agree_on_every_pair(codec, divergence):
    """One table, two readers: the config refuses (naming distill.divergence) exactly the offline pairs
    that the divergences refuse; online distillation reads dense targets, so any divergence goes."""
    overrides = [f"targets.codec={codec}", f"distill.divergence={divergence}", "distill.mode=offline"]
    if divergence in PAIRS[codec]:
        load_config(TINY, overrides)
        divergences.check_pairing(codec, divergence)
    else:
        with pytest.raises(ConfigError, match=r"bad config key 'distill\.divergence'"):
            load_config(TINY, overrides)
        with pytest.raises(ValueError, match=f"cannot be computed from '{codec}'"):
            divergences.check_pairing(codec, divergence)
    load_config(TINY, [*overrides[:2], "distill.mode=online"])


def test_every_schedule_is_one_the_lr_knows():
    assert lr.SCHEDULES == choice_names(Schedule) == ("constant", "cosine")
    for schedule in Schedule:
        assert lr.lr_at(10, 1.0, 0, 100, schedule) > 0
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr.lr_at(10, 1.0, 0, 100, "linear")


@pytest.mark.parametrize("override,key", [
    ("targets.codec=topp", "targets.codec"),
    ("distill.divergence=kl", "distill.divergence"),
    ("optim.schedule=linear", "optim.schedule"),
    ("targets.verify=warn", "targets.verify"),
    ("data.source=csv", "data.source"),
    ("teacher.source=hub", "teacher.source"),
    ("engine.precision=fp16", "engine.precision"),
    ("distill.mode=async", "distill.mode"),
    ("eval.weights=best", "eval.weights"),
    ("eval.gen_ppl=gpt2", "eval.gen_ppl"),
    ("eval.mauve_protocol=webtext", "eval.mauve_protocol"),
    ("sampling.order=left", "sampling.order"),
    ("sampling.grid=log", "sampling.grid"),
])
def test_a_value_outside_the_choices_names_the_key_and_the_override(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert f"command line ('{override}'): bad config key '{key}'" in str(e.value)


def test_typed_choices_compare_as_strings_and_are_written_as_plain_names(tmp_path):
    cfg = load_config(TINY, ["targets.codec=sampled", "distill.divergence=fkl", "optim.schedule=cosine",
                             "targets.verify=skip"])
    assert (cfg.targets.codec, cfg.distill.divergence, cfg.optim.schedule, cfg.targets.verify) == (
        "sampled", "fkl", "cosine", "skip")
    assert f"{cfg.targets.codec}/{cfg.distill.divergence}" == "sampled/fkl"  # messages and logs read the value
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    for line in ("  codec: sampled\n", "  divergence: fkl\n", "  schedule: cosine\n", "  verify: skip\n"):
        assert line in text
    assert "Codec" not in text and "Divergence" not in text
    assert load_config(tmp_path / "config.yaml") == cfg and to_yaml(load_config(tmp_path / "config.yaml")) == text


def test_a_config_built_in_code_with_plain_strings_is_validated_and_written_alike(tmp_path):
    """A run folder's config.yaml from before the choices were typed holds the same plain strings; a
    config assembled in code (dataclasses.replace with a str) reads and writes the same file."""
    import dataclasses

    from trainer.config import validate

    cfg = load_config(TINY)
    plain = dataclasses.replace(cfg, targets=dataclasses.replace(cfg.targets, codec="dense"),
                                distill=dataclasses.replace(cfg.distill, divergence="mse"))
    validate(plain)
    typed = load_config(TINY, ["targets.codec=dense", "distill.divergence=mse"])
    assert to_yaml(plain) == to_yaml(typed) and plain == typed
    bad = dataclasses.replace(cfg, targets=dataclasses.replace(cfg.targets, verify="warn"))
    with pytest.raises(ConfigError, match=r"bad config key 'targets\.verify': 'warn' is not one of fail, skip"):
        validate(bad)
    assert VerifyPolicy.skip == "skip"


def test_the_modules_that_implement_a_choice_accept_exactly_its_names():
    """The sampler's orders and grids, gen-PPL's protocols and the engine's precisions are read from
    the config's enums: one list each, and every name is one the implementation runs."""
    import torch

    from trainer.config import GenPPL, Precision, TimeGrid, UnmaskOrder
    from trainer.evaluation import protocols
    from trainer.method import diffusion
    from trainer.runtime.engine import resolve_precision

    assert diffusion.ORDERS == choice_names(UnmaskOrder) and diffusion.GRIDS == choice_names(TimeGrid)
    assert protocols.GEN_PPL_PROTOCOLS == choice_names(GenPPL)
    x, lengths = torch.tensor([[5, 2, 3, 2, 0]]), torch.tensor([5])
    for protocol in GenPPL:
        assert protocols.scored_mask(x, lengths, eos_id=2, protocol=protocol).any()
    assert {resolve_precision(p) for p in Precision} <= {"fp32", "bf16"}
    with pytest.raises(ValueError, match="engine.precision"):
        resolve_precision("fp16")
