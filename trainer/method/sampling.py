"""Samplers built on trainer.method.diffusion: N-step ancestral sampling (with prediction caching and
prefix conditioning) for masked diffusion models, and KV-cached sampling for the AR baseline.

Samplers take *denoisers*, not models, so a teacher, a student and an imported checkpoint all
sample through the same code. A denoiser is a callable ``(xt [B, L], t [B]) -> log-probs [N, V]``:
log p(x0 | x_t) over the V real tokens at the N masked positions of xt, in row-major order (the
positions ``xt == MASK`` select); visible positions are never predicted (SUBS keeps them).
Everything is batched, runs on the tensors' device, and draws randomness only from the generator it
is given.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainer.method import diffusion

Denoiser = Callable[[Tensor, Tensor], Tensor]


def make_denoiser(model: nn.Module, mask_id: int, noise_eps: float, time_conditioning: bool = False,
                  autocast: bool = True) -> Denoiser:
    """Wrap a DiT as a denoiser: log p(x0 | x_t) [N, V] at the N masked positions, in inference mode.

    Only the masked positions go through the output head and the softmax (``DiT(rows=...)``): SUBS
    makes every visible position a copy of its token, which no caller needs to be told.
    On CUDA the forward runs under bf16 autocast (the logits come back in float32 either way).
    """

    @torch.no_grad()
    def denoise(xt: Tensor, t: Tensor) -> Tensor:
        sigma = diffusion.sigma_of_t(t.float(), noise_eps).to(xt.device) if time_conditioning else None
        use_amp = autocast and xt.device.type == "cuda"
        with torch.autocast(device_type=xt.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(xt, sigma, rows=xt == mask_id)
        return diffusion.masked_log_probs(logits, mask_id)

    return denoise


@torch.no_grad()
def sample_diffusion(denoise: Denoiser, batch_size: int, seq_len: int, steps: int, mask_id: int, *,
                     noise_eps: float, sampling_eps: float, generator: torch.Generator,
                     device: torch.device | str = "cpu", cache: bool = True,
                     prefix: Tensor | None = None, progress: bool = False,
                     stats: dict | None = None, temperature: float = 1.0, top_p: float = 1.0,
                     min_p: float = 0.0, order: str = "random", grid: str = "linear") -> Tensor:
    """Ancestral sampling from all-MASK over ``steps`` steps, then an argmax for anything left.

    cache: reuse the previous denoiser output when no token changed in the last step. Only valid
    for time-agnostic denoisers (the output then depends on x alone): the caller decides.
    prefix: LongTensor [P] or [B, P] clamped onto the first P positions before every step.
    stats: if given, receives ``nfe`` (number of denoiser calls).
    temperature: every token is drawn from softmax(log p / temperature), in float64
    (``diffusion.tempered_cdf``); the final argmax does not depend on it. The noise drawn is the same
    at every temperature, so samples at several temperatures (and of several models) stay paired.
    top_p, min_p, order, grid: the training-free samplers (``sampling.*``; trainer/method/diffusion.py
    ``truncation_mask``, ``confidence_unmask``, ``time_grid``). The defaults are MDLM's sampler, bit
    for bit. Every variant draws the same noise per step (2 L uniforms per sample), so at equal steps
    sample i of every variant and model uses the same uniforms; with order="confidence" which
    positions unmask depends on the model, so samples still pair (i.i.d. over i) but less closely.
    """
    device = torch.device(device)
    x = torch.full((batch_size, seq_len), mask_id, dtype=torch.long, device=device)
    clamp = _prefix_clamp(prefix, batch_size, device)
    x = clamp(x)
    times = diffusion.time_grid(steps, sampling_eps, grid)
    log_p, nfe = None, 0
    for i in tqdm(range(steps), desc=f"sampling {steps} steps", disable=not progress, leave=False):
        t = times[i].expand(batch_size)
        s = times[i + 1].expand(batch_size)
        if log_p is None or not cache:
            log_p = denoise(x, t.float())
            nfe += 1
        x_next = clamp(diffusion.ancestral_step(log_p, x, t, s, mask_id, noise_eps, generator, temperature,
                                                top_p, min_p, order))
        if not torch.equal(x_next, x):
            log_p = None  # the input changed: the cached prediction is stale
        x = x_next
    if (x == mask_id).any():
        if log_p is None or not cache:
            log_p = denoise(x, times[-1].expand(batch_size).float())
            nfe += 1
        x = clamp(diffusion.final_step(log_p, x, mask_id))
    if stats is not None:
        stats["nfe"] = nfe
    return x


def sampler_options(spec) -> dict:
    """The training-free sampler options of a config section (``sampling`` or an ``eval.samplers``
    entry) as ``sample_diffusion`` keywords."""
    return {"top_p": float(spec.top_p), "min_p": float(spec.min_p), "order": spec.order, "grid": spec.grid}


def _prefix_clamp(prefix: Tensor | None, batch_size: int, device: torch.device) -> Callable[[Tensor], Tensor]:
    if prefix is None:
        return lambda x: x
    prefix = prefix.to(device=device, dtype=torch.long)
    if prefix.dim() == 1:
        prefix = prefix.unsqueeze(0).expand(batch_size, -1)
    n = prefix.shape[1]

    def clamp(x: Tensor) -> Tensor:
        x = x.clone()
        x[:, :n] = prefix
        return x

    return clamp


@torch.no_grad()
def sample_ar(model: nn.Module, batch_size: int, seq_len: int, bos_id: int, *, generator: torch.Generator,
              device: torch.device | str = "cpu", use_cache: bool = True, progress: bool = False) -> Tensor:
    """Left-to-right sampling from a causal model (``DiT(cfg, causal=True)``), float64 Gumbel.

    The input starts with BOS; the output excludes it. ``bos_id`` doubles as the excluded MASK column
    of the head, so it is never sampled. With ``use_cache`` each step feeds one token through the
    KV cache; without, the whole prefix is re-encoded (the reference for the cache's correctness).
    """
    device = torch.device(device)
    x = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    cache = model.init_cache(batch_size, seq_len + 1, device) if use_cache else None
    for i in tqdm(range(seq_len), desc="AR sampling", disable=not progress, leave=False):
        use_amp = device.type == "cuda"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            if cache is not None:
                logits = model.forward_cached(x[:, -1:], cache, start_pos=i)[:, -1]
            else:
                logits = model(x)[:, -1]
        logits = logits.float()
        logits[:, bos_id] = diffusion.NEG_INF
        nxt = diffusion.gumbel_argmax(torch.log_softmax(logits, dim=-1), generator)
        x = torch.cat([x, nxt.unsqueeze(1)], dim=1)
    return x[:, 1:]
