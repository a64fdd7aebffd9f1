"""The published-MDLM-layout exporter (trainer/model/mdlm_export.py) against the importer and the layout
facts: exact round trip, MDLM's key names and config fields, refusals that name the problem."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import COND, HEADS, LAYERS, LENGTH, V1, D, hf_config, mdlm_state_dict, write_checkpoint
from trainer.config import ModelConfig
from trainer.model.dit import DiT
from trainer.model.mdlm_export import MDLMExportError, export_mdlm
from trainer.model.mdlm_import import import_mdlm

CFG = ModelConfig(vocab_size=V1 - 1, n_layers=LAYERS, d_model=D, n_heads=HEADS, cond_dim=COND, max_seq_len=LENGTH,
                  dropout=0.1)


def _random_state(cfg: ModelConfig, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in DiT(cfg).state_dict().items()}


def test_export_then_import_is_exact(tmp_path):
    state = _random_state(CFG)
    out = export_mdlm(tmp_path / "mdlm", state, CFG, extra={"round": 2})
    model, cfg = import_mdlm(out)  # config inferred from the files alone
    assert cfg == CFG
    back = model.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert json.loads((out / "sdtt_export.json").read_text()) == {"round": 2}


def test_layout_is_the_published_one(tmp_path):
    """Same keys (prefix, rotary table included), shapes and config fields as an MDLM checkpoint
    written from the layout facts (tests/unit/test_mdlm_import.py), not from our model."""
    ref_dir = write_checkpoint(tmp_path / "ref", mdlm_state_dict(), config=hf_config())
    ref = load_file(ref_dir / "model.safetensors")
    model, cfg = import_mdlm(ref_dir)
    out = export_mdlm(tmp_path / "out", model.state_dict(), cfg)
    ours = load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert all(torch.equal(ours[k], ref[k]) for k in ref)  # inv_freq too
    written = json.loads((out / "config.json").read_text())
    assert {k: written[k] for k in hf_config()} == hf_config()
    assert written["model_type"] == "mdlm"


def test_time_conditioning_and_heads_survive(tmp_path):
    cfg = dataclasses.replace(CFG, n_heads=2, time_conditioning=True)
    out = export_mdlm(tmp_path / "m", _random_state(cfg), cfg)
    _, back = import_mdlm(out)
    assert back.n_heads == 2 and back.time_conditioning is True


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(MDLMExportError, match="mlp_ratio"):
        cfg = dataclasses.replace(CFG, mlp_ratio=2)
        export_mdlm(tmp_path / "a", _random_state(cfg), cfg)
    with pytest.raises(MDLMExportError, match="rope_base"):
        export_mdlm(tmp_path / "b", _random_state(CFG), dataclasses.replace(CFG, rope_base=500.0))
    state = _random_state(CFG)
    state["blocks.0.attn_out.weight"] = torch.zeros(D, D + 1)
    with pytest.raises(MDLMExportError, match="blocks.0.attn_out.weight"):
        export_mdlm(tmp_path / "c", state, CFG)
    export_mdlm(tmp_path / "d", _random_state(CFG), CFG)
    with pytest.raises(MDLMExportError, match="already exists"):
        export_mdlm(tmp_path / "d", _random_state(CFG), CFG)
    export_mdlm(tmp_path / "d", _random_state(CFG, seed=9), CFG, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
