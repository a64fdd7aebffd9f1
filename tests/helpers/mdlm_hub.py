"""What MDLM's and SDTT's own code read of a checkpoint in the published MDLM layout, stated from their
sources (kuleshov-group/mdlm @c112c52, the hub repository kuleshov-group/mdlm-owt, jdeschena/sdtt
@9172b86), and a condensed re-statement of the hub's remote code to load an export through.

Who reads what:
- MDLM ``diffusion.py:105-107`` (``backbone: hf_dit``) and SDTT ``multi_round_sdtt.py:170-178`` load the
  teacher with ``AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)``: the ``auto_map``
  of config.json names ``configuration_mdlm.MDLMConfig`` and ``modeling_mdlm.MDLM``.
- The hub's ``MDLMConfig.__init__`` reads eight fields (below, with the types of mdlm-owt's
  config.json); ``PretrainedConfig`` reads ``return_dict`` (mdlm-owt ships ``false``).
- The hub's ``MDLM.forward(input_ids, timesteps, output_hidden_states=None, return_dict=None)`` falls back
  to ``config.use_return_dict``: with ``return_dict: false`` it returns the logits tensor
  ``[batch, length, vocab_size]``, otherwise a ``MaskedLMOutput``.
- MDLM ``diffusion.py:316`` calls ``self.backbone(x, sigma)`` positionally and indexes the result as a
  tensor (``_subs_parameterization``: ``logits[:, :, self.mask_index] += self.neg_infinity``, with
  ``mask_index`` = the tokenizer's size, the last row, ``diffusion.py:87, 261-263``); SDTT
  ``multi_round_sdtt.py:220, 229, 236`` does the same with ``self.backbone(xt, cond)`` and
  ``self.teacher[0](xt, cond)``. An output object there raises
  ``TypeError: tuple indices must be integers or slices, not tuple``.
- The weights are ``model.safetensors`` under ``backbone.`` (MDLM's ``MDLM.backbone = DITBackbone``),
  the rotary table ``backbone.rotary_emb.inv_freq`` included (a persistent buffer there).

The two files below follow the hub's module tree and forward (MDLM's dit.py with flash-attn's packed
varlen attention written as SDPA, fp32, no fused kernels), written for these tests; ``MDLM.__init__``
does not call ``post_init()``, as the hub's does not.
"""
from __future__ import annotations

from pathlib import Path

# config.json keys the consumers read -> (type, mdlm-owt's value)
MDLM_OWT_CONFIG = {
    "vocab_size": (int, 50258),
    "model_length": (int, 1024),
    "hidden_dim": (int, 768),
    "cond_dim": (int, 128),
    "n_blocks": (int, 12),
    "n_heads": (int, 12),
    "dropout": (float, 0.1),
    "time_conditioning": (bool, False),
    "return_dict": (bool, False),
    "model_type": (str, "mdlm"),
    "architectures": (list, ["MDLM"]),
    "auto_map": (dict, {"AutoConfig": "configuration_mdlm.MDLMConfig",
                        "AutoModelForMaskedLM": "modeling_mdlm.MDLM"}),
}
# Keys whose value is the model's own (the rest must equal mdlm-owt's).
PER_MODEL = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads", "dropout",
             "time_conditioning")

CONFIGURATION_MDLM = '''
import transformers


class MDLMConfig(transformers.PretrainedConfig):
    model_type = "mdlm"

    def __init__(self, vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12,
                 n_heads=12, dropout=0.1, time_conditioning=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
'''

MODELING_MDLM = '''
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import modeling_outputs

from .configuration_mdlm import MDLMConfig


class LayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x):
        return F.layer_norm(x.float(), [self.dim]) * self.weight[None, None, :]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Rotary(nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, x):
        t = torch.arange(x.shape[1]).type_as(self.inv_freq)
        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class EmbeddingLayer(nn.Module):
    def __init__(self, dim, vocab_dim):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))

    def forward(self, x):
        return self.embedding[x]


class DDiTBlock(nn.Module):
    def __init__(self, dim, n_heads, cond_dim, mlp_ratio=4, dropout=0.1):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x, cos_sin, c):
        b, s, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \\
            self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        qkv = self.attn_qkv(h).view(b, s, 3, self.n_heads, d // self.n_heads)
        cos, sin = (t[None, :, None, :] for t in cos_sin)
        q, k, v = qkv.unbind(2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + gate_msa * self.attn_out(o.transpose(1, 2).reshape(b, s, d))
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class DDitFinalLayer(nn.Module):
    def __init__(self, hidden_size, out_channels, cond_dim):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DITBackbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.hidden_dim // config.n_heads)
        self.blocks = nn.ModuleList([DDiTBlock(config.hidden_dim, config.n_heads, config.cond_dim,
                                               dropout=config.dropout) for _ in range(config.n_blocks)])
        self.output_layer = DDitFinalLayer(config.hidden_dim, config.vocab_size, config.cond_dim)

    def forward(self, indices, sigma, output_hidden_states=False):
        if not self.config.time_conditioning:
            sigma = torch.zeros_like(sigma)
        x = self.vocab_embed(indices)
        c = F.silu(self.sigma_map(sigma))
        cos_sin = self.rotary_emb(x)
        hidden = [x]
        for block in self.blocks:
            x = block(x, cos_sin, c)
            hidden.append(x)
        return self.output_layer(x, c), hidden


class MDLM(transformers.PreTrainedModel):
    config_class = MDLMConfig
    base_model_prefix = "mdlm"

    def __init__(self, config):
        super().__init__(config)  # the hub's MDLM never calls self.post_init()
        self.backbone = DITBackbone(config)

    def forward(self, input_ids=None, timesteps=None, output_hidden_states=None, return_dict=None):
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        logits, hidden = self.backbone(input_ids, timesteps, output_hidden_states)
        if return_dict:
            return modeling_outputs.MaskedLMOutput(logits=logits, hidden_states=hidden if output_hidden_states
                                                   else None, loss=None)
        if output_hidden_states:
            return logits, hidden
        return logits
'''


def add_remote_code(directory: Path) -> Path:
    """Put the two remote-code files beside an export, as the docs tell a user to do with the hub's."""
    (directory / "configuration_mdlm.py").write_text(CONFIGURATION_MDLM)
    (directory / "modeling_mdlm.py").write_text(MODELING_MDLM)
    return directory
