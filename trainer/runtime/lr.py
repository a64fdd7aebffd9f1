"""Learning-rate schedules as pure functions of the optimizer step.

The engine sets the rate on every optimizer step from ``lr_at(step)``, so a schedule has no state to
save: a resumed run at step ``k`` computes exactly the rate the uninterrupted run used at ``k``.
"""
from __future__ import annotations

import math

from trainer.config import Schedule, choice_names

SCHEDULES = choice_names(Schedule)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "constant", min_lr_ratio: float = 0.1) -> float:
    """Rate for optimizer step ``step`` (0-based: the first update is step 0).

    Linear warmup reaches ``base_lr`` on step ``warmup_steps - 1`` (step 0 already gets
    ``base_lr / warmup_steps``, never a useless zero); then either constant, or a half cosine from
    ``base_lr`` down to ``min_lr_ratio * base_lr`` at ``total_steps`` and flat after that.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule '{schedule}' (expected one of {', '.join(SCHEDULES)})")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def segment_total(step: int, segment: int, total_steps: int) -> int:
    """The ``total_steps`` the schedule decays to at ``step`` when it restarts every ``segment`` steps
    (0 = never): the end of the segment holding the step, (step // segment + 1) x segment, capped at
    ``total_steps``. Distillation round r's engine decays to round_start + steps_per_round (its own
    end), so a run split into rounds of ``segment`` steps (the control) gets the students' very rates."""
    if segment <= 0:
        return total_steps
    return min(total_steps, (step // segment + 1) * segment)
