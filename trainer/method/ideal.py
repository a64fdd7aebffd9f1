"""The ideal SDTT student of a teacher: the best any student of one round could learn, as a denoiser.

One SDTT round trains the student's single prediction at x_t to match, per masked position, the
teacher's prediction at whichever of its m steps of size dt unmasked that position (a random target:
``sdtt.teacher_rollout``). The minimiser of the expected divergence over those targets is, per
position (the loss is a sum over positions, and the student's output at a position is free):

* reverse KL, KL(s || target): s ∝ exp E[log target], the normalised geometric mean;
* forward KL, KL(target || s): s = E[target], the arithmetic mean.

``ideal_denoiser`` estimates that optimum at any x_t by Monte Carlo over R independent teacher
rollouts from x_t (the same rule, code and step size as the targets the student is trained on), so
sampling it in N steps measures what a perfectly trained round-r student would score: the ceiling
that a trained student's gain over its teacher is compared with. With m = 1 the target is the
teacher's own prediction and the ideal student is the teacher.

Pure: tensors in and out, randomness only from the generator given.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from trainer.config import IDEAL_DIVERGENCES as _IDEAL
from trainer.config import choice_names
from trainer.method import sdtt
from trainer.method.sampling import Denoiser

IDEAL_DIVERGENCES = choice_names(_IDEAL)  # declared in trainer/config.py


def combine_targets(log_targets: Tensor, divergence: str) -> Tensor:
    """The per-position optimum over R target draws ``log_targets`` [R, N, V] (log-probs): float64 log
    of the normalised geometric mean (rkl) or of the mean (fkl), [N, V]."""
    lt = log_targets.double()
    if divergence == "rkl":
        return torch.log_softmax(lt.mean(0), dim=-1)
    if divergence == "fkl":
        return torch.logsumexp(lt, dim=0) - math.log(lt.shape[0])
    raise ValueError(f"the ideal student is defined for {', '.join(IDEAL_DIVERGENCES)}, not '{divergence}'")


def ideal_denoiser(teacher: Denoiser, *, dt: float, teacher_steps: int, rollouts: int, divergence: str,
                   mask_id: int, noise_eps: float, t_min: float, generator: torch.Generator) -> Denoiser:
    """The ideal student of one SDTT round as a denoiser ``(xt [B, L], t [B]) -> log-probs [N, V]``.

    At each call the teacher makes ``rollouts`` independent m-step rollouts from (x_t, t) with step
    ``dt`` (``sdtt.teacher_rollout``, all R copies in one batch); their targets are combined per
    position by ``combine_targets``. Random and time-dependent: never cache its output.
    """
    if rollouts < 1:
        raise ValueError(f"ideal_denoiser: rollouts={rollouts}, need at least 1")
    if divergence not in IDEAL_DIVERGENCES:
        raise ValueError(f"the ideal student is defined for {', '.join(IDEAL_DIVERGENCES)}, not '{divergence}'")

    @torch.no_grad()
    def denoise(xt: Tensor, t: Tensor) -> Tensor:
        n = int((xt == mask_id).sum())
        copies = xt.repeat(rollouts, 1)  # copy k of sample b is row k * B + b
        out = sdtt.teacher_rollout(teacher, copies, t.repeat(rollouts), dt, teacher_steps, mask_id, noise_eps,
                                   generator, t_min)
        # Row-major over the copies: copy k's N masked positions are the k-th block of N target rows.
        return combine_targets(out.log_probs.view(rollouts, n, -1), divergence).float()

    return denoise
