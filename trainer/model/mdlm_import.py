"""Import a teacher published in MDLM's layout (e.g. kuleshov-group/mdlm-owt, downloaded locally), or
one of SDTT's published students (jdeschena/sdtt revisions), as a teacher or a baseline.

The HF checkpoint is ``model.safetensors`` (MDLM's dit.py module under a ``backbone.`` prefix) plus
``config.json`` (vocab_size incl. MASK, hidden_dim, cond_dim, n_blocks, n_heads, model_length,
dropout, time_conditioning). A raw dit.py state dict without the prefix is accepted too. Our DiT uses
MDLM's parameter names, so the mapping is a prefix strip; ``rotary_emb.inv_freq`` (a derived buffer,
non-persistent in our model) is checked against the config and dropped.

SDTT publishes its models as ``MultiRoundSDTT`` dumps (``PyTorchModelHubMixin``: ``model.safetensors``
of the whole module, ``config.json`` = its Hydra config). The module's only weights are its
``backbone``: for students started from the hub's mdlm-owt (``parameterization.start_from_hf``) that is
the hub's ``MDLM``, whose own ``backbone`` is MDLM's DiT, hence ``backbone.backbone.*`` keys; for
SDTT's own teachers (``model.type: ddit-orig``, a copy of MDLM's dit.py) ``backbone.*``. The shape
settings come from the Hydra config (``model.hidden_size``, ``model.n_heads``, ``model.length``, ...).

Only safetensors are read: unpickling a .bin/.pt/.ckpt file can execute arbitrary code.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from trainer.config import ModelConfig
from trainer.errors import BadInput
from trainer.model.dit import DiT

PREFIX = "backbone."
SDTT_HF_PREFIX = "backbone.backbone."  # MultiRoundSDTT.backbone (the hub's MDLM).backbone (MDLM's DiT)
COMPILED_PREFIX = "_orig_mod."  # a torch.compile'd module's state dict
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INV_FREQ_KEY = "rotary_emb.inv_freq"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What shapes cannot tell, when there is no config.json: the published mdlm-owt values.
MDLM_OWT_HEADS = 12
MDLM_OWT_LENGTH = 1024


class MDLMImportError(BadInput, ValueError):
    """A checkpoint that cannot be imported; the message names the file and the key."""


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return path / WEIGHTS_FILE
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        why = f"only pickle checkpoints ({', '.join(pickled)}), " if pickled else ""
        raise MDLMImportError(f"{path}: no {WEIGHTS_FILE} found; {why}a safetensors file is required "
                              "(pickle files are never loaded: unpickling can execute arbitrary code)")
    if path.suffix in PICKLE_SUFFIXES:
        raise MDLMImportError(f"{path}: refusing a pickle checkpoint: unpickling can execute arbitrary code; "
                              "convert it to safetensors in a trusted environment first")
    if not path.is_file():
        raise MDLMImportError(f"{path}: no such file or directory")
    if path.suffix != ".safetensors":
        raise MDLMImportError(f"{path}: expected a .safetensors file or a directory holding {WEIGHTS_FILE}")
    return path


def strip_layout_prefix(raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """MDLM's DiT key names from any published layout: SDTT's ``backbone.backbone.`` (students started
    from the hub model) when its keys carry it, else MDLM's ``backbone.``; torch.compile's
    ``_orig_mod.`` is dropped first. A key outside the layout keeps its name (and is refused later as
    unexpected)."""
    keys = {k.replace(COMPILED_PREFIX, ""): v for k, v in raw.items()}
    prefix = SDTT_HF_PREFIX if any(k.startswith(SDTT_HF_PREFIX) for k in keys) else PREFIX
    return {k.removeprefix(prefix): v for k, v in keys.items()}


def load_mdlm_state_dict(path: str | Path) -> dict[str, Tensor]:
    """MDLM weights from a directory (its model.safetensors) or a .safetensors file, with the
    layout's prefix stripped (:func:`strip_layout_prefix`). Never unpickles."""
    file = _weights_file(path)
    try:
        raw = load_file(file)
    except (SafetensorError, OSError) as e:
        raise MDLMImportError(f"{file}: cannot read safetensors: {e}") from None
    return strip_layout_prefix(raw)


# SDTT's Hydra config (model.*, top-level time_conditioning) -> MDLM's config.json field names.
SDTT_MODEL_FIELDS = {"hidden_size": "hidden_dim", "cond_dim": "cond_dim", "n_blocks": "n_blocks",
                     "n_heads": "n_heads", "length": "model_length", "dropout": "dropout"}
SDTT_MDLM_TYPE = "ddit-orig"  # SDTT's copy of MDLM's dit.py; its "ddit" is another architecture


def from_sdtt_config(raw: Mapping, file: Path) -> dict:
    """MDLM's config.json fields from SDTT's saved Hydra config (what ``MultiRoundSDTT.from_pretrained``
    reads back with OmegaConf). A student started from the hub model is MDLM's DiT whatever
    ``model.type`` says; otherwise only ``ddit-orig`` has MDLM's layout."""
    model = raw["model"]
    start_from_hf = bool((raw.get("parameterization") or {}).get("start_from_hf", False))
    if not start_from_hf and model.get("type", SDTT_MDLM_TYPE) != SDTT_MDLM_TYPE:
        raise MDLMImportError(f"{file}: 'model.type' is {model.get('type')!r}: only SDTT's "
                              f"'{SDTT_MDLM_TYPE}' (MDLM's DiT) has the published MDLM layout")
    out = {ours: model[theirs] for theirs, ours in SDTT_MODEL_FIELDS.items() if theirs in model}
    if "time_conditioning" in raw:
        out["time_conditioning"] = raw["time_conditioning"]
    return out


def _read_hf_config(path: str | Path) -> dict:
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise MDLMImportError(f"{file}: not valid JSON: {e}") from None
    if isinstance(raw.get("model"), dict):  # SDTT's Hydra config, not MDLM's flat MDLMConfig
        return from_sdtt_config(raw, file)
    return raw


def _shape(state_dict: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise MDLMImportError(f"cannot infer the model shape: missing key '{key}'")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise MDLMImportError(f"cannot infer the model shape: key '{key}' has shape {shape}, expected {ndim}-D")
    return shape


def infer_model_config(state_dict: Mapping[str, Tensor], hf_config: Mapping | None = None) -> ModelConfig:
    """Vocabulary, width, depth, cond_dim and MLP ratio from the tensor shapes (prefix stripped).

    The head count is not in any weight shape; it comes from config.json's ``n_heads`` if given, else
    from ``rotary_emb.inv_freq`` (head_dim / 2 entries) if stored, else mdlm-owt's 12. The context
    (``model_length``, default 1024), ``dropout`` and ``time_conditioning`` also come from config.json.
    """
    hf = dict(hf_config or {})
    num_embeddings, d = _shape(state_dict, "vocab_embed.embedding", 2)
    cond_dim, _ = _shape(state_dict, "sigma_map.mlp.0.weight", 2)
    hidden, _ = _shape(state_dict, "blocks.0.mlp.0.weight", 2)
    n_layers = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    if INV_FREQ_KEY in state_dict and "n_heads" not in hf:
        n_heads = d // (2 * state_dict[INV_FREQ_KEY].numel())
    else:
        n_heads = int(hf.get("n_heads", MDLM_OWT_HEADS))
    if d % n_heads or (d // n_heads) % 2:
        raise MDLMImportError(f"n_heads={n_heads} does not give an even head dimension for hidden size {d}; "
                              f"write it in {CONFIG_FILE} or pass a ModelConfig")
    if hidden % d:
        raise MDLMImportError(f"key 'blocks.0.mlp.0.weight': MLP width {hidden} is not a multiple of {d}")
    defaults = ModelConfig()
    return ModelConfig(
        vocab_size=num_embeddings - 1,  # the last row is MASK
        n_layers=n_layers,
        d_model=d,
        n_heads=n_heads,
        cond_dim=cond_dim,
        mlp_ratio=hidden // d,
        max_seq_len=int(hf.get("model_length", MDLM_OWT_LENGTH)),
        dropout=float(hf.get("dropout", defaults.dropout)),
        time_conditioning=bool(hf.get("time_conditioning", defaults.time_conditioning)),
    )


def _check_inv_freq(found: Tensor | None, model: DiT, file: Path) -> None:
    """A stored rotary table must be the one our (head_dim, rope_base) produce: a mismatch means the
    head count or rope base is wrong, which no weight shape would reveal."""
    if found is None:
        return
    expected = model.rotary_emb.inv_freq
    if found.shape != expected.shape:
        raise MDLMImportError(f"{file}: key '{INV_FREQ_KEY}': expected shape {tuple(expected.shape)}, found "
                              f"{tuple(found.shape)} (head dim {model.rotary_emb.head_dim}: wrong n_heads?)")
    if not torch.allclose(found.float(), expected, rtol=1e-4, atol=0.0):
        raise MDLMImportError(f"{file}: key '{INV_FREQ_KEY}': the stored rotary frequencies are not those of "
                              f"rope_base={model.rotary_emb.base} with head dim {model.rotary_emb.head_dim}")


def import_mdlm(path: str | Path, cfg: ModelConfig | None = None) -> tuple[DiT, ModelConfig]:
    """Build a DiT holding the MDLM checkpoint at ``path`` (a directory or a .safetensors file).

    ``cfg`` (e.g. the run's model config) is checked against the checkpoint; without it the config is
    inferred (``infer_model_config``). Every expected key must be present with its exact shape, and no
    unknown key may remain. Returns the float32 CPU model (in train mode, as constructed) and its config.
    """
    file = _weights_file(path)
    state_dict = load_mdlm_state_dict(file)
    hf = _read_hf_config(path)
    if cfg is None:
        try:
            cfg = infer_model_config(state_dict, hf)
        except MDLMImportError as e:
            raise MDLMImportError(f"{file}: {e}") from None
    else:
        # The two settings that change the output yet leave every weight shape alone.
        for key in ("n_heads", "time_conditioning"):
            if key in hf and hf[key] != getattr(cfg, key):
                raise MDLMImportError(f"{file.parent / CONFIG_FILE}: '{key}' is {hf[key]!r} but the "
                                      f"given model config has model.{key}={getattr(cfg, key)!r}")
    model = DiT(cfg)
    inv_freq = state_dict.pop(INV_FREQ_KEY, None)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MDLMImportError(f"{file}: missing key(s) {', '.join(map(repr, missing[:5]))}{more}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise MDLMImportError(f"{file}: unexpected key(s) {', '.join(map(repr, unexpected[:5]))}{more}: "
                              "not MDLM's DiT layout")
    for key, want in expected.items():
        got = state_dict[key]
        if got.shape != want.shape:
            raise MDLMImportError(f"{file}: key '{key}': expected shape {tuple(want.shape)}, "
                                  f"found {tuple(got.shape)}")
        if not got.is_floating_point():
            raise MDLMImportError(f"{file}: key '{key}': expected floating point weights, found {got.dtype}")
    _check_inv_freq(inv_freq, model, file)  # after the weights: a wrong width is clearer said there
    model.load_state_dict(state_dict, strict=True)
    return model, cfg
