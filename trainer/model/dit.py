"""The DiT backbone of MDLM/SDTT, and its causal twin (the autoregressive baseline and judge).

Parameter names and shapes are MDLM's (``models/dit.py``), so a published MDLM checkpoint loads after
stripping its ``backbone.`` prefix (trainer/model/mdlm_import.py). Same numerics too: adaLN-modulated
pre-norm blocks, rotary q/k with the half-split convention, tanh-GELU MLP, untied head.

The module knows nothing of devices, distribution or precision: autocast or a bf16 cast of the whole
module (DeepSpeed's bf16 mode) is the caller's business; logits always come back in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainer.config import ModelConfig

FREQ_EMBED_DIM = 256  # size of the sinusoidal sigma embedding fed to sigma_map (DiT/MDLM)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def rotate_half(x: Tensor) -> Tensor:
    """Half-split rotation (GPT-NeoX / flash-attn non-interleaved): [x1, x2] -> [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _activation_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype q/k/v will have: autocast's if it is on for this device, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def _attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """SDPA over [B, H, T, hd] queries and [B, H, S, hd] keys; causal masks are bottom-right aligned,
    i.e. query i sits at absolute position S - T + i (what a KV cache needs)."""
    t, s = q.shape[-2], k.shape[-2]
    if not causal or t == 1:  # one new token may see every cached key
        return F.scaled_dot_product_attention(q, k, v)
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # SDPA's is_causal is top-left aligned for t != s, wrong for a chunk appended after a prefix.
    pos_q = torch.arange(s - t, s, device=q.device)
    mask = torch.arange(s, device=q.device)[None, :] <= pos_q[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class EmbeddingLayer(nn.Module):
    """A raw [V + 1, d] parameter, not nn.Embedding, so the key is MDLM's ``vocab_embed.embedding``."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(num_embeddings, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.embedding)  # = embedding[x], with the dedicated backward kernel


class TimestepEmbedder(nn.Module):
    """sigma -> 256-dim sinusoid [cos | sin] -> Linear -> SiLU -> Linear (DiT's timestep embedder)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: Tensor) -> Tensor:
        half = FREQ_EMBED_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None, :]
        emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary frequencies for one head dimension, and a cos/sin table cached by length and dtype.

    ``inv_freq`` is a NON-persistent buffer: it is derived from (head_dim, rope_base), so our state
    dicts and exports carry only learned weights, and the importer validates then drops MDLM's copy.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)
        self._table: tuple[Tensor, Tensor] | None = None

    def _inv_freq(self, device: torch.device | None) -> Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base ** exponent)

    def _apply(self, fn, recurse=True):
        # Recompute instead of converting. module.bfloat16() (DeepSpeed's bf16 mode casts the whole
        # model) would round the frequencies, and at position ~1000 the angles would drift by
        # radians; to_empty() after meta-device construction would leave garbage.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.inv_freq.device)
        self._table = None
        return self

    def forward(self, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [end, head_dim] for positions 0 .. end - 1 (angles computed in fp32)."""
        table = self._table
        if table is None or table[0].shape[0] < end or table[0].dtype != dtype:
            pos = torch.arange(end, dtype=torch.float32, device=self.inv_freq.device)
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            table = self._table = (emb.cos().to(dtype), emb.sin().to(dtype))
        return table[0][:end], table[1][:end]


class DDiTBlock(nn.Module):
    """x += gate_msa * attn(modulate(norm1(x))); x += gate_mlp * mlp(modulate(norm2(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.norm1 = nn.LayerNorm(d, bias=False)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)  # packed q | k | v, heads inside each
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * d, d)
        )
        # Zero init (DiT): every block starts as the identity, whatever the conditioning.
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        cos: Tensor,
        sin: Tensor,
        causal: bool,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        b, t, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        )
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = self.attn_qkv(h).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        qk = qkv[:2] * cos + rotate_half(qkv[:2]) * sin  # q and k in one op; v is not rotated
        q, k, v = qk[0], qk[1], qkv[2]  # [B, H, T, hd]
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            end = start_pos + t
            k_cache[:, :, start_pos:end] = k
            v_cache[:, :, start_pos:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        y = _attention(q, k, v, causal).transpose(1, 2).reshape(b, t, d)
        x = x + gate_msa * F.dropout(self.attn_out(y), self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(h, self.dropout, self.training)


class DDitFinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_final = nn.LayerNorm(d, bias=False)
        self.linear = nn.Linear(d, cfg.vocab_size + 1)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * d)
        # Zero init as DiT/MDLM: an untrained model predicts uniform logits.
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor, rows: Tensor | None = None) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)  # [B, 1, d] each
        if rows is None:
            return self.linear(modulate(self.norm_final(x), shift, scale))
        batch_of_row = rows.nonzero(as_tuple=True)[0]
        return self.linear(modulate(self.norm_final(x[rows]), shift[batch_of_row, 0], scale[batch_of_row, 0]))


@dataclass
class KVCache:
    """Preallocated keys and values, each [n_layers, B, n_heads, max_len, head_dim]."""

    k: Tensor
    v: Tensor

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class DiT(nn.Module):
    """MDLM's DiT. ``causal=True`` gives the autoregressive variant (same blocks, causal attention,
    KV cache); its input starts with BOS = MASK id = vocab_size and position i predicts token i."""

    def __init__(self, cfg: ModelConfig, causal: bool = False):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.vocab_embed = EmbeddingLayer(cfg.vocab_size + 1, cfg.d_model)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.blocks = nn.ModuleList(DDiTBlock(cfg) for _ in range(cfg.n_layers))
        self.output_layer = DDitFinalLayer(cfg)

    def _cond(self, sigma: Tensor | None, x: Tensor) -> Tensor:
        if not self.cfg.time_conditioning:
            # MDLM/SDTT: a time-agnostic denoiser is fed sigma = 0, whatever the caller passes.
            sigma = torch.zeros(x.shape[0], device=x.device)
        elif sigma is None:
            raise ValueError("this model is time conditioned (model.time_conditioning=true): pass sigma")
        return F.silu(self.sigma_map(sigma))

    def _act_dtype(self, device: torch.device) -> torch.dtype:
        return _activation_dtype(device, self.vocab_embed.embedding.dtype)

    def forward(self, x: Tensor, sigma: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """x: Long [B, L]; sigma: [B] (ignored unless time conditioned) -> float32 logits [B, L, V + 1].

        rows: optional bool [B, L]; then only those positions go through the output head and the
        result is [N, V + 1] (N = rows.sum(), row-major order, i.e. ``logits[rows]``). A masked
        diffusion model is only ever asked about its masked positions, and at GPT-2's vocabulary the
        head is about a quarter of a forward (tools/bench.py targets).
        """
        h = self.vocab_embed(x)
        c = self._cond(sigma, x)
        cos, sin = self.rotary_emb(x.shape[1], self._act_dtype(x.device))  # once for all blocks
        for block in self.blocks:
            h = block(h, c, cos, sin, self.causal)
        return self.output_layer(h, c, rows).float()

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache; dtype defaults to the activations' (autocast's if on, else the weights')."""
        device = torch.device(device)
        cfg = self.cfg
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)
        dtype = dtype or self._act_dtype(device)
        return KVCache(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

    @torch.no_grad()
    def forward_cached(self, x_new: Tensor, cache: KVCache, start_pos: int) -> Tensor:
        """Run x_new (Long [B, T], absolute positions start_pos ..) against the cache, append its
        keys/values, and return float32 logits [B, T, V + 1]. Entries past start_pos + T are stale
        and never read, so rewinding start_pos reuses the cache."""
        if not self.causal:
            raise RuntimeError("forward_cached needs the causal model: DiT(cfg, causal=True)")
        end = start_pos + x_new.shape[1]
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: positions up to {end} > cache max_len {cache.max_len}")
        h = self.vocab_embed(x_new)
        c = self._cond(None, x_new)
        cos, sin = self.rotary_emb(end, cache.k.dtype)
        cos, sin = cos[start_pos:], sin[start_pos:]
        for i, block in enumerate(self.blocks):
            h = block(h, c, cos, sin, True, (cache.k[i], cache.v[i]), start_pos)
        return self.output_layer(h, c).float()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
