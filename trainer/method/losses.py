"""The two training losses as pure functions of a ``forward`` callable (an engine, or a plain model).

``forward(xt, sigma, rows=mask)`` returns the logits of the rows ``mask`` selects; the head runs
on the masked positions only, since neither loss is taken anywhere else.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from trainer.config import RunConfig
from trainer.method import codecs, diffusion, divergences

Forward = Callable[..., Tensor]


def mdlm_loss(forward: Forward, x0: Tensor, gen: torch.Generator, cfg: RunConfig) -> Tensor:
    """The MDLM ELBO on one micro-batch x0 [B, L] (on the forward's device): mask at a random time
    drawn from ``gen``, predict the masked tokens."""
    mask_id, eps = cfg.model.vocab_size, cfg.diffusion.noise_eps
    t = diffusion.sample_times(x0.shape[0], gen, cfg.diffusion.train_eps, cfg.diffusion.antithetic)
    xt = diffusion.mask_tokens(x0, t, mask_id, eps, gen)
    sigma = diffusion.sigma_of_t(t, eps).to(x0.device) if cfg.model.time_conditioning else None
    log_probs = diffusion.masked_log_probs(forward(xt, sigma, rows=xt == mask_id), mask_id)
    return diffusion.elbo_nll_at(log_probs, x0, xt, t, mask_id, eps).mean()


def sdtt_loss(forward: Forward, xt: Tensor, t: Tensor, targets: codecs.Targets, cfg: RunConfig, kind: str) -> Tensor:
    """Mean divergence ``kind`` over the masked positions between the student's ONE prediction on
    x_t [B, L] and the teacher's targets (rows in the masked positions' order)."""
    mask_id, eps = cfg.model.vocab_size, cfg.diffusion.noise_eps
    sigma = diffusion.sigma_of_t(t, eps).to(xt.device) if cfg.model.time_conditioning else None
    student = diffusion.masked_log_probs(forward(xt, sigma, rows=xt == mask_id), mask_id)
    return divergences.masked_mean(divergences.sparse_divergence(student, targets, kind))
