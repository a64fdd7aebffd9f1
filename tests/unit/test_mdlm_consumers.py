"""An exported student, read the way MDLM's and SDTT's own code read mdlm-owt (tests/helpers/mdlm_hub.py states
what they read): config.json's keys and types, the remote-code route, the forward called positionally
returning the logits tensor, and MDLM's SUBS indexing on it."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from tests.helpers.mdlm_hub import MDLM_OWT_CONFIG, PER_MODEL, add_remote_code
from trainer.config import ModelConfig
from trainer.model.dit import DiT
from trainer.model.mdlm_export import export_mdlm

CFG = ModelConfig(vocab_size=97, n_layers=2, d_model=32, n_heads=4, cond_dim=16, max_seq_len=24, dropout=0.1)


def _student(tmp_path, cfg=CFG):
    torch.manual_seed(5)
    model = DiT(cfg)
    with torch.no_grad():  # non-zero adaLN/output layers: a forward that says something
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = add_remote_code(export_mdlm(tmp_path / "student", model.state_dict(), cfg))
    return model.eval(), out


def _load_as_mdlm_does(directory):
    """AutoModelForMaskedLM.from_pretrained's steps, done by hand: the config and the class through
    the auto_map (trust_remote_code), then the safetensors loaded strictly."""
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True)
    cls = get_class_from_dynamic_module(config.auto_map["AutoModelForMaskedLM"], directory)
    model = cls(config)
    model.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    return model.eval()


def _subs(logits, xt, mask_index):
    """MDLM's _subs_parameterization / SDTT's, on the forward's result (indexing a tensor)."""
    logits[:, :, mask_index] += -1e6
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = xt != mask_index
    logits[unmasked] = -1e6
    logits[unmasked, xt[unmasked]] = 0
    return logits


def test_config_has_every_key_the_loaders_read_with_mdlm_owts_types(tmp_path):
    _, out = _student(tmp_path)
    written = json.loads((out / "config.json").read_text())
    for key, (typ, owt_value) in MDLM_OWT_CONFIG.items():
        assert key in written, f"config.json lacks '{key}'"
        # bool is an int subclass in Python, not in JSON: compare the exact type
        assert type(written[key]) is typ, f"'{key}': {type(written[key]).__name__}, mdlm-owt has {typ.__name__}"
        if key not in PER_MODEL:
            assert written[key] == owt_value, key
    assert written["vocab_size"] == CFG.vocab_size + 1 and written["n_blocks"] == CFG.n_layers


def test_export_runs_in_mdlm_and_sdtt_forward(tmp_path):
    ours, out = _student(tmp_path)
    model = _load_as_mdlm_does(out)
    assert model.config.use_return_dict is False
    g = torch.Generator().manual_seed(0)
    mask_index = CFG.vocab_size  # MDLM: the tokenizer's size, the last row
    xt = torch.randint(0, CFG.vocab_size + 1, (3, CFG.max_seq_len), generator=g)
    xt[:, ::3] = mask_index
    sigma = torch.rand(3, generator=g)
    with torch.no_grad():
        logits = model(xt, sigma)  # diffusion.py:316, multi_round_sdtt.py:220/229: positional, no kwargs
        assert isinstance(logits, torch.Tensor) and logits.shape == (3, CFG.max_seq_len, CFG.vocab_size + 1)
        torch.testing.assert_close(logits, ours(xt, sigma), atol=1e-5, rtol=1e-5)
        log_probs = _subs(logits.clone(), xt, mask_index)
    masked = xt == mask_index
    torch.testing.assert_close(log_probs[masked].exp().sum(-1), torch.ones(int(masked.sum())))


def test_without_return_dict_false_the_consumers_fail(tmp_path):
    """The bug the key fixes: mdlm-owt's own config says return_dict false; without it the forward
    returns an output object and MDLM's indexing raises."""
    _, out = _student(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["return_dict"]
    (out / "config.json").write_text(json.dumps(cfg))
    model = _load_as_mdlm_does(out)
    xt = torch.zeros(1, CFG.max_seq_len, dtype=torch.long)
    result = model(xt, torch.zeros(1))
    assert not isinstance(result, torch.Tensor)
    with pytest.raises(TypeError):
        _subs(result, xt, CFG.vocab_size)


def test_from_pretrained_route_and_the_transformers_pin(tmp_path):
    """AutoModelForMaskedLM.from_pretrained itself: it works under transformers 4.x (MDLM and SDTT pin
    4.38.2); transformers 5's loader needs post_init(), which the hub's MDLM never calls. This is the
    reason for the <5 bound of the mdlm-hub extra in pyproject.toml: when it stops failing, lift it."""
    ours, out = _student(tmp_path)
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        with pytest.raises(AttributeError, match="all_tied_weights_keys"):
            transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)
    else:
        model = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
        xt = torch.randint(0, CFG.vocab_size, (2, CFG.max_seq_len))
        with torch.no_grad():
            torch.testing.assert_close(model(xt, torch.zeros(2)), ours(xt, torch.zeros(2)),
                                       atol=1e-5, rtol=1e-5)
