"""Pure MDLM math: the log-linear schedule, forward masking, the ELBO and one ancestral step.

Conventions (docs/CONTRACTS.md): token ids are int64, the MASK id is the vocabulary size V, and
log-probabilities have V + 1 columns with the MASK column at -inf. Every categorical is drawn in
float64 (Gumbel-max, or the inverse CDF for the ancestral step): float32 noise truncates the tail of
the distribution, lowers sample entropy and flatters generative perplexity (Zheng et al. 2024).
Randomness always comes from an explicit ``torch.Generator``; nothing here touches the global RNG.
"""
from __future__ import annotations

import torch
from torch import Tensor

from trainer.config import TimeGrid, UnmaskOrder, choice_names

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------
def move_chance(t: Tensor, eps: float) -> Tensor:
    """Probability that a token is masked at time t: (1 - eps) t."""
    return (1.0 - eps) * t


def sigma_of_t(t: Tensor, eps: float) -> Tensor:
    """Total noise sigma(t) = -log(1 - move_chance(t)), the quantity the network is conditioned on."""
    return -torch.log1p(-move_chance(t, eps))


def elbo_weight(t: Tensor, eps: float) -> Tensor:
    """dsigma/dt / expm1(sigma): the continuous-time ELBO weight. Equals 1/t for the log-linear schedule."""
    dsigma = (1.0 - eps) / (1.0 - move_chance(t, eps))
    return dsigma / torch.expm1(sigma_of_t(t, eps))


def sample_times(n: int, generator: torch.Generator, train_eps: float, antithetic: bool = True) -> Tensor:
    """t ~ U(train_eps, 1), stratified over the batch when antithetic (lower-variance ELBO estimate)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if antithetic:
        u = (u / n + torch.arange(n, dtype=torch.float64) / n) % 1.0
    return ((1.0 - train_eps) * u + train_eps).float()


def mask_tokens(x0: Tensor, t: Tensor, mask_id: int, eps: float, generator: torch.Generator) -> Tensor:
    """Forward process: each token independently becomes MASK with probability move_chance(t)."""
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    p = move_chance(t.to(torch.float64), eps).to(x0.device)[:, None]
    return torch.where(u < p, torch.full_like(x0, mask_id), x0)


# --------------------------------------------------------------------------------------------------
# Denoiser output and loss
# --------------------------------------------------------------------------------------------------
def subs_log_probs(logits: Tensor, xt: Tensor, mask_id: int) -> Tensor:
    """SUBS parameterisation: never predict MASK, and carry visible tokens over unchanged.

    Returns float32 log-probs [B, L, V + 1]: MASK column -inf, visible positions one-hot (0 on
    their token, -inf elsewhere). Out-of-place, so it is safe on autograd outputs.
    """
    bias = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
    bias[mask_id] = NEG_INF
    log_probs = torch.log_softmax(logits.float() + bias, dim=-1)
    visible = (xt != mask_id).unsqueeze(-1)
    # Visible rows: all -inf, then 0 on their token. One masked_fill and a [B, L, 1] scatter instead of
    # a full -inf tensor and a where: two fewer passes over [B, L, V + 1] (GBs per batch at GPT-2's
    # vocabulary; tools/bench.py targets). A masked row's scatter writes -inf into its MASK column,
    # which already holds -inf. masked_fill does not keep its output for backward: the in-place
    # scatter_ is safe under autograd.
    out = log_probs.masked_fill(visible, NEG_INF)
    return out.scatter_(-1, xt.unsqueeze(-1), torch.where(visible, 0.0, NEG_INF))


def masked_log_probs(masked_logits: Tensor, mask_id: int) -> Tensor:
    """SUBS at masked positions: log p(x0 | x_t) over the V real tokens [N, V] from the logits of
    those positions [N, V + 1] (``DiT(..., rows=xt == mask_id)``). MASK is never predicted: its
    column is dropped, the same as setting it to -inf before the softmax."""
    return torch.log_softmax(masked_logits[:, :mask_id].float(), dim=-1)


def elbo_nll(log_probs: Tensor, x0: Tensor, xt: Tensor, t: Tensor, mask_id: int, eps: float) -> Tensor:
    """Per-sequence NLL bound in nats per token: sum over masked positions of w(t) * CE, over L.

    Its batch mean is both the MDLM training loss and the validation NLL bound.
    """
    masked = xt == mask_id
    ce = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    ce = torch.where(masked, ce, torch.zeros_like(ce))  # visible positions are -(-inf)*0 otherwise
    weight = elbo_weight(t.float(), eps).to(ce.device)[:, None]
    return (weight * ce).sum(-1) / x0.shape[-1]


def elbo_nll_at(log_probs: Tensor, x0: Tensor, xt: Tensor, t: Tensor, mask_id: int, eps: float) -> Tensor:
    """``elbo_nll`` from the log-probs of the masked positions only, ``log_probs`` [N, V]
    (``masked_log_probs``): the training loss without a head or a softmax at visible positions."""
    masked = xt == mask_id
    sample = masked.nonzero(as_tuple=True)[0]  # the sample of each masked position
    ce = -log_probs.gather(-1, x0[masked].unsqueeze(-1)).squeeze(-1)  # [N]
    weight = elbo_weight(t.float(), eps).to(ce.device)
    per_seq = torch.zeros(x0.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, sample, weight[sample] * ce)
    return per_seq / x0.shape[-1]


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def gumbel_argmax(log_weights: Tensor, generator: torch.Generator) -> Tensor:
    """Draw from softmax(log_weights) along the last dim by Gumbel-max, in float64.

    The noise is drawn on the generator's device and moved: a CPU generator gives the same samples
    on any device (reproducible CPU/GPU comparisons); a generator on the GPU avoids the copy.
    """
    u = torch.rand(log_weights.shape, generator=generator, dtype=torch.float64, device=generator.device)
    # Keep u in the open interval (0, 1) so the Gumbel noise is finite.
    tiny = torch.finfo(torch.float64).tiny
    gumbel = -torch.log(-torch.log(u.clamp_(min=tiny, max=1.0 - 2**-53)))
    return (log_weights.double() + gumbel.to(log_weights.device)).argmax(dim=-1)


def ancestral_uniforms(batch: int, length: int, generator: torch.Generator) -> Tensor:
    """The noise of one ancestral step: float64 uniforms [batch, 2, length] on the generator's device
    (a CPU generator gives the same samples on any device)."""
    return torch.rand((batch, 2, length), generator=generator, dtype=torch.float64, device=generator.device)


def tempered_cdf(log_p: Tensor, temperature: float = 1.0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """The float64 unnormalised CDF [n, V] of softmax(log_p / temperature) (its last column is the total),
    truncated by ``truncation_mask`` when top_p < 1 or min_p > 0 (on the tempered law, as transformers'
    samplers order them: temperature first, then the cut).

    temperature = 1 is the model's own law (exp of log_p, as before: no renormalisation needed);
    otherwise the tempered log-weights are shifted by their row maximum before exp, in float64, so
    even a low temperature neither overflows nor rounds the tail to zero in float32. With top_p = 1
    and min_p = 0 nothing else is computed: the plain sampler's CDF, bit for bit.
    """
    if not temperature > 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature}")
    lp = log_p.double()
    if temperature != 1.0:
        lp = lp / temperature
        lp = lp - lp.max(dim=-1, keepdim=True).values
    w = lp.exp()
    if top_p < 1.0 or min_p > 0.0:
        w = torch.where(truncation_mask(w, top_p, min_p), w, torch.zeros_like(w))
    return torch.cumsum(w, dim=-1)


def truncation_mask(weights: Tensor, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Which tokens a truncated sampler keeps, bool [n, V], from non-negative float64 weights [n, V]
    (any normalisation).

    min_p: keep the tokens whose probability is at least min_p x the row's largest (min-p sampling).
    top_p: then, on what min-p kept (renormalised), keep the smallest set of most likely tokens whose
    mass is >= top_p (nucleus sampling). Duo's and SDTT's filter (``utils.top_k_top_p_filtering``)
    keeps tokens until the mass strictly exceeds p: the same set except when a prefix's mass equals p
    exactly, where theirs keeps one token more. Ties in probability are ordered by token id (stable
    sort). The most likely token is always kept.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
    w = weights.double()
    keep = torch.ones_like(w, dtype=torch.bool)
    if min_p > 0.0:
        keep = w >= min_p * w.max(dim=-1, keepdim=True).values
        w = torch.where(keep, w, torch.zeros_like(w))
    if top_p < 1.0:
        p = w / w.sum(dim=-1, keepdim=True)
        sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the more likely tokens
        keep_sorted = before < top_p
        keep_sorted[..., 0] = True
        keep = keep & torch.zeros_like(keep).scatter_(-1, order, keep_sorted)
    return keep


ORDERS = choice_names(UnmaskOrder)
GRIDS = choice_names(TimeGrid)


def ancestral_update(log_p_x0: Tensor, xt: Tensor, t: Tensor, s: Tensor, mask_id: int, eps: float,
                     u: Tensor, temperature: float = 1.0, top_p: float = 1.0, min_p: float = 0.0,
                     order: str = "random") -> Tensor:
    """One reverse step t -> s < t given the denoiser's log p(x0 | x_t) [N, V] at the N masked
    positions of ``xt`` (row-major order: the denoiser contract) and the step's noise ``u``
    [B, 2, L] (``ancestral_uniforms``).

    The law is q(x_s | x_t, x0 ~ p): a masked token stays masked with probability a_s / a_t
    (a = move_chance), else takes v with probability p(v | x_t); visible tokens never change. It is
    the law of Gumbel-max over the log-weights log p(v) + log(a_t - a_s) (MASK: log a_s), drawn with
    two float64 uniforms per position instead: u[:, 0] decides stay/unmask, u[:, 1] picks the token
    by the float64 inverse CDF of p, built only for the positions that unmask.

    Why not Gumbel-max: it needs L x (V + 1) float64 noise per sample and step, 3.3 GB per tensor at
    batch 8, L = 1024 and GPT-2's vocabulary, as costly as a forward of the 170M model on CPU
    (tools/bench.py sampling --breakdown); most steps of a many-step sampler unmask a handful of
    tokens, and a step that unmasks none now costs 2 L uniforms.

    temperature, top_p, min_p: the token is drawn from softmax(log p / temperature), truncated
    (``tempered_cdf``, float64); with order="random" the stay/unmask decision does not depend on them,
    nor on the model, so with the same noise two models or two temperatures unmask the same positions
    at the same steps (paired samples).

    order="confidence" (training-free, ``confidence_unmask``): a token is drawn at every masked
    position with u[:, 1], and the k most confident of them are kept, k the schedule's expected count
    (``unmask_count``); the rest stay masked. Which positions unmask now depends on the model.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown unmasking order '{order}' (expected one of {', '.join(ORDERS)})")
    a_t = move_chance(t.double(), eps).to(xt.device)
    a_s = move_chance(s.double(), eps).to(xt.device)
    u = u.to(xt.device)
    masked = xt == mask_id
    out = xt.clone()
    if order == "confidence":
        if not masked.any():
            return out
        cdf = tempered_cdf(log_p_x0, temperature, top_p, min_p)  # [N, V], every masked position
        tok, prob = _inverse_cdf(cdf, u[:, 1][masked], mask_id)
        conf = torch.full(xt.shape, -1.0, dtype=torch.float64, device=xt.device)
        conf[masked] = prob
        k = unmask_count(masked.sum(dim=1), a_t, a_s)
        unmask = confidence_unmask(conf, masked, k, u[:, 0])
        drawn = torch.full_like(xt, mask_id)
        drawn[masked] = tok
        out[unmask] = drawn[unmask]
        return out
    unmask = masked & (u[:, 0] >= (a_s / a_t)[:, None])
    which = unmask[masked]  # [N]: the masked rows that unmask, in the same (row-major) order
    if which.any():
        cdf = tempered_cdf(log_p_x0[which], temperature, top_p, min_p)  # [n, V]
        out[unmask] = _inverse_cdf(cdf, u[:, 1][unmask], mask_id)[0]
    return out


def _inverse_cdf(cdf: Tensor, u: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """(token, its probability) drawn with uniforms u [n] from unnormalised CDFs [n, V]."""
    # right=True: the first token whose CDF exceeds u * total, so a zero-probability token (a flat
    # step of the CDF) is never drawn; u < 1 keeps the index below V (clamped against rounding).
    total = cdf[:, -1:]
    tok = torch.searchsorted(cdf, u[:, None] * total, right=True).squeeze(-1).clamp_(max=mask_id - 1)
    upper = cdf.gather(-1, tok[:, None])
    lower = torch.where(tok[:, None] > 0, cdf.gather(-1, (tok - 1).clamp(min=0)[:, None]), torch.zeros_like(upper))
    return tok, ((upper - lower) / total).squeeze(-1)


def unmask_count(n_masked: Tensor, a_t: Tensor, a_s: Tensor) -> Tensor:
    """How many of a row's ``n_masked`` positions a deterministic-count sampler unmasks from t to s: the
    schedule's expected count given the current state, n (a_t - a_s) / a_t, rounded so that the number
    left masked, round(n a_s / a_t) (half up), is an integer; with s at the end of the grid (a_s ~ 0)
    every position unmasks. int64 [B]."""
    keep = torch.floor(n_masked.double() * (a_s / a_t) + 0.5).long()
    return n_masked - torch.minimum(keep, n_masked)


def confidence_unmask(conf: Tensor, masked: Tensor, k: Tensor, tie: Tensor) -> Tensor:
    """bool [B, L]: per row, the ``k`` [B] masked positions with the highest confidence ``conf`` [B, L]
    (ties: the lower ``tie`` value first; ``tie`` [B, L], distinct almost surely: the step's uniforms).

    MaskGIT's and LLaDA's low-confidence remasking: decode the positions the model is surest of, a
    number per step set by the schedule, instead of a random subset of that expected size.
    """
    by_tie = torch.argsort(tie, dim=1)
    score = torch.where(masked, conf, torch.full_like(conf, -2.0)).gather(1, by_tie)
    order = by_tie.gather(1, torch.sort(score, dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return masked & (rank < k[:, None])


def ancestral_step(log_p_x0: Tensor, xt: Tensor, t: Tensor, s: Tensor, mask_id: int, eps: float,
                   generator: torch.Generator, temperature: float = 1.0, top_p: float = 1.0, min_p: float = 0.0,
                   order: str = "random") -> Tensor:
    """``ancestral_update`` with its noise drawn from ``generator`` (2 L uniforms per sample)."""
    return ancestral_update(log_p_x0, xt, t, s, mask_id, eps,
                            ancestral_uniforms(xt.shape[0], xt.shape[1], generator), temperature, top_p, min_p, order)


def final_step(log_p_x0: Tensor, xt: Tensor, mask_id: int) -> Tensor:
    """Fill whatever is still masked with the denoiser's most likely real token (``log_p_x0``
    [N, V] at the masked positions, as ``ancestral_update``)."""
    out = xt.clone()
    out[xt == mask_id] = log_p_x0.argmax(dim=-1)
    return out


def time_grid(steps: int, sampling_eps: float, kind: str = "linear") -> Tensor:
    """The sampling times t_0 = 1 > ... > t_steps = sampling_eps in float64; step i goes from t_i to t_{i+1}.

    linear: t_i = linspace(1, sampling_eps, steps + 1), MDLM's grid.
    cosine: t_i = sampling_eps + (1 - sampling_eps) cos(pi/2 * i / steps): MaskGIT's cosine mask
    schedule (the masked fraction is ~t here), which unmasks few tokens first, while the model sees
    least, and more as context accumulates.
    """
    if kind == "linear":
        return torch.linspace(1.0, sampling_eps, steps + 1, dtype=torch.float64)
    if kind == "cosine":
        i = torch.arange(steps + 1, dtype=torch.float64)
        grid = sampling_eps + (1.0 - sampling_eps) * torch.cos(0.5 * torch.pi * i / steps)
        grid[0], grid[-1] = 1.0, sampling_eps  # exact ends, whatever cos rounds to
        return grid
    raise ValueError(f"unknown time grid '{kind}' (expected one of {', '.join(GRIDS)})")
