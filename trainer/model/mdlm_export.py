"""Export a model in the published MDLM layout (what kuleshov-group/mdlm-owt ships), the inverse of
trainer/model/mdlm_import.py.

The folder holds ``model.safetensors`` (MDLM's dit.py state dict under the ``backbone.`` prefix,
``backbone.rotary_emb.inv_freq`` included as MDLM stores it) and ``config.json`` in the fields of
MDLM's Hugging Face ``MDLMConfig`` (vocab_size incl. MASK, model_length, hidden_dim, cond_dim,
n_blocks, n_heads, dropout, time_conditioning). ``import_mdlm`` reads it back to the same weights.

Only what MDLM's architecture can say is exported: an MLP ratio other than 4 or a rotary base other
than 10,000 has no field in MDLM's config and no equivalent in its code, so such a model is refused
rather than written as a checkpoint that other tools would load wrongly.

To load the folder with ``transformers.AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)``
(what MDLM's ``backbone=hf_dit`` and SDTT's teacher loading call), copy MDLM's ``configuration_mdlm.py``
and ``modeling_mdlm.py`` (from the mdlm-owt repository) beside it; the ``auto_map`` in config.json names
them. They are MDLM's code, not shipped here, and load under transformers < 5 (the hub's ``MDLM`` never
calls ``post_init()``, which transformers 5's loader needs). tests/helpers/mdlm_hub.py states what that code
reads; tests/unit/test_mdlm_consumers.py checks an export against it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from trainer.config import ModelConfig
from trainer.fileio import replace_dir
from trainer.model.dit import DiT
from trainer.model.mdlm_import import CONFIG_FILE, INV_FREQ_KEY, PREFIX, WEIGHTS_FILE

MDLM_MLP_RATIO = 4
MDLM_ROPE_BASE = 10000.0


class MDLMExportError(ValueError):
    """A model or destination that cannot be exported; the message names the key or path."""


def hf_config(cfg: ModelConfig) -> dict:
    """config.json in MDLM's ``MDLMConfig`` fields (vocab_size counts MASK, as MDLM's does)."""
    return {
        "architectures": ["MDLM"],
        "model_type": "mdlm",
        "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                     "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
        "vocab_size": cfg.vocab_size + 1,
        "model_length": cfg.max_seq_len,
        "hidden_dim": cfg.d_model,
        "cond_dim": cfg.cond_dim,
        "n_blocks": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "dropout": cfg.dropout,
        "time_conditioning": cfg.time_conditioning,
        # MDLM's diffusion.py and SDTT's distiller index the forward's result as the logits tensor: the
        # hub's MDLM.forward returns it only when return_dict is false (else a MaskedLMOutput).
        "return_dict": False,
        "torch_dtype": "float32",
    }


def mdlm_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our DiT state dict -> MDLM's published one: checked key by key against a DiT of ``cfg``,
    ``backbone.`` prefixed, rotary frequencies added, float32 contiguous CPU copies."""
    if cfg.mlp_ratio != MDLM_MLP_RATIO:
        raise MDLMExportError(f"model.mlp_ratio={cfg.mlp_ratio}: MDLM's DiT has a fixed MLP ratio of "
                              f"{MDLM_MLP_RATIO}; this model has no published-layout equivalent")
    if cfg.rope_base != MDLM_ROPE_BASE:
        raise MDLMExportError(f"model.rope_base={cfg.rope_base}: MDLM's rotary base is fixed at "
                              f"{MDLM_ROPE_BASE:g}; this model has no published-layout equivalent")
    model = DiT(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise MDLMExportError(f"state dict does not match model config {cfg}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    out: dict[str, Tensor] = {}
    for key, want in expected.items():
        got = state_dict[key]
        if tuple(got.shape) != tuple(want.shape):
            raise MDLMExportError(f"key '{key}': shape {tuple(got.shape)}, the model config says "
                                  f"{tuple(want.shape)}")
        out[PREFIX + key] = got.detach().to("cpu", torch.float32).contiguous().clone()
    out[PREFIX + INV_FREQ_KEY] = model.rotary_emb.inv_freq.detach().float().contiguous().clone()
    return out


def export_mdlm(out_dir: str | Path, state_dict: Mapping[str, Tensor], cfg: ModelConfig,
                *, overwrite: bool = False, extra: Mapping | None = None) -> Path:
    """Write ``out_dir`` in the published MDLM layout, atomically (a temporary folder renamed into
    place); refuse an existing folder unless ``overwrite``. ``extra`` (provenance: run, round,
    weights) goes to ``sdtt_export.json`` beside the two MDLM files."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MDLMExportError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    tensors = mdlm_state_dict(state_dict, cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".tmp-{out_dir.name}-"))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
        if extra:
            (tmp / "sdtt_export.json").write_text(json.dumps(dict(extra), indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
