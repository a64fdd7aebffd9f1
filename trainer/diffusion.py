"""Pure MDLM math: the log-linear schedule, forward masking, the ELBO and one ancestral step.

Conventions (docs/CONTRACTS.md): token ids are int64, the MASK id is the vocabulary size V, and
log-probabilities have V + 1 columns with the MASK column at -inf. Every categorical is drawn with
the Gumbel-max trick in float64: float32 Gumbel noise truncates the tail of the distribution, lowers
sample entropy and flatters generative perplexity (Zheng et al. 2024). Randomness always comes from
an explicit ``torch.Generator``; nothing here touches the global RNG.
"""
from __future__ import annotations

import torch
from torch import Tensor

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


def elbo_nll(log_probs: Tensor, x0: Tensor, xt: Tensor, t: Tensor, mask_id: int, eps: float) -> Tensor:
    """Per-sequence NLL bound in nats per token: sum over masked positions of w(t) * CE, over L.

    Its batch mean is both the MDLM training loss and the validation NLL bound.
    """
    masked = xt == mask_id
    ce = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    ce = torch.where(masked, ce, torch.zeros_like(ce))  # visible positions are -(-inf)*0 otherwise
    weight = elbo_weight(t.float(), eps).to(ce.device)[:, None]
    return (weight * ce).sum(-1) / x0.shape[-1]


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


def ancestral_log_weights(log_p_x0: Tensor, t: Tensor, s: Tensor, mask_id: int, eps: float) -> Tensor:
    """Unnormalised float64 log q(x_s | x_t, x0 ~ p): real v -> p(v) (a_t - a_s), MASK -> a_s.

    a = move_chance; t, s are [B]. Normalising (dividing by a_t) is unnecessary for Gumbel-max.
    """
    a_t = move_chance(t.double(), eps).to(log_p_x0.device)[:, None, None]
    a_s = move_chance(s.double(), eps).to(log_p_x0.device)[:, None, None]
    log_w = log_p_x0.double() + torch.log(a_t - a_s)
    log_w[..., mask_id] = torch.log(a_s)[..., 0]
    return log_w


def ancestral_step(log_p_x0: Tensor, xt: Tensor, t: Tensor, s: Tensor, mask_id: int, eps: float,
                   generator: torch.Generator) -> Tensor:
    """One reverse step t -> s < t. Visible tokens never change; a masked token stays masked with
    probability a_s / a_t, else takes a token drawn from p(x0 | x_t)."""
    drawn = gumbel_argmax(ancestral_log_weights(log_p_x0, t, s, mask_id, eps), generator)
    return torch.where(xt == mask_id, drawn, xt)


def final_step(log_p_x0: Tensor, xt: Tensor, mask_id: int) -> Tensor:
    """Fill whatever is still masked with the denoiser's most likely real token."""
    real = log_p_x0[..., :mask_id]
    return torch.where(xt == mask_id, real.argmax(dim=-1), xt)


def time_grid(steps: int, sampling_eps: float) -> Tensor:
    """t_i = linspace(1, sampling_eps, steps + 1) in float64; step i goes from t_i to t_{i+1}."""
    return torch.linspace(1.0, sampling_eps, steps + 1, dtype=torch.float64)
