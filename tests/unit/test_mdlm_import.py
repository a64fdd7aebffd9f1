"""Importing a teacher in MDLM's published layout, checked against an independent reference forward.

The reference below is written from the published MDLM checkpoint layout (kuleshov-group/mdlm-owt),
in float64 with explicit formulas (manual LayerNorm, tanh-GELU, per-pair rotary, softmax attention),
and reads the weights by MDLM's key names. It shares no code with
trainer/model/dit.py, so a wrong key mapping, rotary convention, chunk order or modulate would show.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import (
    COND,
    HEADS,
    LAYERS,
    LENGTH,
    V1,
    D,
    hf_config,
    mdlm_state_dict,
    sdtt_hydra_config,
    write_checkpoint,
)
from trainer.model.mdlm_import import MDLMImportError, import_mdlm, infer_model_config, load_mdlm_state_dict


def reference_forward(sd, x, sigma, n_heads, time_conditioning):
    """MDLM's DiT forward from the published facts, float64, eval mode (no dropout)."""
    w = {k: v.double() for k, v in sd.items()}
    b, length = x.shape
    hd = D // n_heads

    def linear(h, name, bias=True):
        out = h @ w[name + ".weight"].T
        return out + w[name + ".bias"] if bias else out

    def layer_norm(h, weight):  # LayerNorm with a weight and no bias, eps 1e-5
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * weight

    def gelu_tanh(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    def silu(h):
        return h * torch.sigmoid(h)

    def rotary(h):  # [B, L, H, hd]; pairs (j, j + hd/2) rotate by angle pos * base^(-2j/hd)
        half = hd // 2
        freq = torch.tensor([10000.0 ** (-2 * j / hd) for j in range(half)], dtype=torch.float64)
        ang = torch.arange(length, dtype=torch.float64)[:, None] * freq[None, :]
        cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
        h1, h2 = h[..., :half], h[..., half:]
        return torch.cat((h1 * cos - h2 * sin, h2 * cos + h1 * sin), dim=-1)

    if not time_conditioning:
        sigma = torch.zeros(b)
    half = 128
    args = sigma.double()[:, None] * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    t_emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    c = silu(linear(silu(linear(t_emb, "sigma_map.mlp.0")), "sigma_map.mlp.2"))  # blocks get SiLU(cond)

    h = w["vocab_embed.embedding"][x]
    for i in range(LAYERS):
        p = f"blocks.{i}."
        mod = linear(c, p + "adaLN_modulation")[:, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[..., j * D:(j + 1) * D] for j in range(6))
        a = layer_norm(h, w[p + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = linear(a, p + "attn_qkv", bias=False)
        q, k, v = (qkv[..., j * D:(j + 1) * D].reshape(b, length, n_heads, hd) for j in range(3))
        q, k = rotary(q), rotary(k)
        att = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd), dim=-1)  # non-causal
        o = torch.einsum("bhlm,bmhd->blhd", att, v).reshape(b, length, D)
        h = h + gate_msa * linear(o, p + "attn_out", bias=False)
        m = layer_norm(h, w[p + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        h = h + gate_mlp * linear(gelu_tanh(linear(m, p + "mlp.0")), p + "mlp.2")
    mod = linear(c, "output_layer.adaLN_modulation")[:, None, :]
    shift, scale = mod[..., :D], mod[..., D:]
    h = layer_norm(h, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return linear(h, "output_layer.linear")


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V1, (2, LENGTH), generator=g), 3 * torch.rand(2, generator=g)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_import_matches_reference_forward(tmp_path, time_conditioning):
    sd = mdlm_state_dict()
    path = write_checkpoint(tmp_path / "mdlm", sd, config=hf_config(time_conditioning))
    model, cfg = import_mdlm(path)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.cond_dim, cfg.mlp_ratio) == (
        V1 - 1, D, LAYERS, HEADS, COND, 4)
    assert (cfg.max_seq_len, cfg.dropout, cfg.time_conditioning) == (LENGTH, 0.1, time_conditioning)
    x, sigma = inputs()
    expected = reference_forward(sd, x, sigma, HEADS, time_conditioning)
    assert expected.abs().max() > 1.0  # a non-trivial function, so agreement means something
    torch.testing.assert_close(model.eval()(x, sigma).double(), expected, atol=1e-4, rtol=1e-4)


def test_raw_layout_heads_from_rotary_buffer(tmp_path):
    # dit.py's own state dict (no prefix), no config.json: heads come from inv_freq's length.
    sd = mdlm_state_dict(seed=2)
    path = write_checkpoint(tmp_path / "raw", sd, prefix="")
    assert set(load_mdlm_state_dict(path)) == set(sd)
    model, cfg = import_mdlm(path / "model.safetensors")
    assert cfg.n_heads == HEADS and cfg.max_seq_len == 1024  # the mdlm-owt default length
    x, sigma = inputs()
    torch.testing.assert_close(model.eval()(x, sigma).double(), reference_forward(sd, x, sigma, HEADS, False),
                               atol=1e-4, rtol=1e-4)


def test_given_config_is_checked(tmp_path):
    path = write_checkpoint(tmp_path / "mdlm", mdlm_state_dict(), config=hf_config())
    cfg = infer_model_config(load_mdlm_state_dict(path), hf_config())
    model, same = import_mdlm(path, cfg)
    assert same == cfg

    with pytest.raises(MDLMImportError, match=r"model.safetensors: key 'vocab_embed.embedding': "
                                              r"expected shape \(41, 64\), found \(41, 32\)"):
        import_mdlm(path, dataclasses.replace(cfg, d_model=64))
    with pytest.raises(MDLMImportError, match=r"config.json: 'n_heads' is 4 .* model.n_heads=2"):
        import_mdlm(path, dataclasses.replace(cfg, n_heads=2))
    with pytest.raises(MDLMImportError, match="rotary_emb.inv_freq.*rope_base=500"):
        import_mdlm(path, dataclasses.replace(cfg, rope_base=500.0))


def test_missing_key(tmp_path):
    sd = mdlm_state_dict()
    del sd["blocks.1.attn_out.weight"]
    path = write_checkpoint(tmp_path / "mdlm", sd, config=hf_config())
    with pytest.raises(MDLMImportError, match=r"mdlm/model.safetensors: missing key\(s\) 'blocks.1.attn_out.weight'"):
        import_mdlm(path)


def test_wrong_shape(tmp_path):
    sd = mdlm_state_dict()
    sd["blocks.1.mlp.2.bias"] = torch.zeros(D + 1)
    path = write_checkpoint(tmp_path / "mdlm", sd, config=hf_config())
    with pytest.raises(MDLMImportError, match=r"model.safetensors: key 'blocks.1.mlp.2.bias': "
                                              r"expected shape \(32,\), found \(33,\)"):
        import_mdlm(path)


def test_unexpected_key(tmp_path):
    sd = mdlm_state_dict() | {"blocks.0.attn_qkv.bias": torch.zeros(3 * D)}
    path = write_checkpoint(tmp_path / "mdlm", sd, config=hf_config())
    with pytest.raises(MDLMImportError, match=r"unexpected key\(s\) 'blocks.0.attn_qkv.bias'"):
        import_mdlm(path)


def test_pickle_checkpoints_are_refused(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "pytorch_model.bin").write_bytes(b"not looked at")
    with pytest.raises(MDLMImportError, match="pytorch_model.bin.*arbitrary code"):
        import_mdlm(directory)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not looked at")
    with pytest.raises(MDLMImportError, match="last.ckpt: refusing a pickle checkpoint"):
        load_mdlm_state_dict(ckpt)


@pytest.mark.parametrize("prefix,start_from_hf", [("backbone.backbone.", True), ("backbone.", False),
                                                   ("backbone._orig_mod.", False)])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_sdtt_published_student_imports(tmp_path, prefix, start_from_hf, time_conditioning):
    """SDTT's MultiRoundSDTT dumps: the module's only weights are its backbone, which is the hub's MDLM
    (keys backbone.backbone.*, rotary table included) for students started from mdlm-owt, or SDTT's copy
    of MDLM's DiT (backbone.*) for its own teachers; config.json is the Hydra config."""
    sd = mdlm_state_dict(seed=4)
    path = write_checkpoint(tmp_path / "sdtt", sd, prefix=prefix,
                            config=sdtt_hydra_config(start_from_hf, time_conditioning=time_conditioning))
    model, cfg = import_mdlm(path)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.cond_dim) == (V1 - 1, D, LAYERS, HEADS, COND)
    assert (cfg.max_seq_len, cfg.dropout, cfg.time_conditioning) == (LENGTH, 0.1, time_conditioning)
    x, sigma = inputs()
    torch.testing.assert_close(model.eval()(x, sigma).double(),
                               reference_forward(sd, x, sigma, HEADS, time_conditioning), atol=1e-4, rtol=1e-4)


def test_sdtt_layouts_that_are_not_mdlms_are_refused(tmp_path):
    sd = mdlm_state_dict()
    path = write_checkpoint(tmp_path / "ddit", sd, config=sdtt_hydra_config(start_from_hf=False, model_type="ddit"))
    with pytest.raises(MDLMImportError, match=r"config.json: 'model.type' is 'ddit'"):
        import_mdlm(path)
    # a student whose keys mix the two prefixes is not one module's state dict
    mixed = {"backbone.backbone." + k: v for k, v in sd.items()} | {"backbone.extra.weight": torch.zeros(2)}
    (tmp_path / "mixed").mkdir()
    save_file(mixed, str(tmp_path / "mixed" / "model.safetensors"))
    with pytest.raises(MDLMImportError, match=r"unexpected key\(s\) 'backbone.extra.weight'"):
        import_mdlm(tmp_path / "mixed")
