"""Pure SDTT math: the teacher's m-step targets and one deterministic training example (the
divergences the student is trained with are trainer/method/divergences.py).

Method facts: the SDTT paper (Deschenaux & Gulcehre, 2024) and MDLM (Sahoo et al., 2024). Two
defects of the public reference code are deliberately NOT reproduced here:
* the teacher's intermediate times are t, t - dt, ..., t - m dt (``teacher_grid``), not a mix of
  t_start and t_end with swapped weights;
* "tvd" is the total variation 1/2 sum_v |p_v - q_v| between probabilities, not an L1 distance
  between log-probabilities (trainer/method/divergences.py).
Categoricals are drawn in float64 (trainer.method.diffusion), randomness only from explicit generators.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from trainer.method import codecs, diffusion

Denoiser = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator]
SEED_DOMAIN = 0x5D77  # separates the target streams from any other use of (seed, round, index)


# --------------------------------------------------------------------------------------------------
# Time grid and step size
# --------------------------------------------------------------------------------------------------
def teacher_dt(student_steps: int, teacher_steps: int, sampling_eps: float) -> float:
    """The teacher's step size dt for a student that samples with ``student_steps`` steps.

    The student samples on linspace(1, sampling_eps, N + 1), steps of (1 - sampling_eps) / N; one
    student step must cover the m teacher steps it is trained to replace, so

        dt = (1 - sampling_eps) / (m * N).

    With SDTT's m = 2 and the round-r student's N_r = start_steps / 2**r this is
    (1 - sampling_eps) / N_{r-1}: the teacher steps exactly on its own sampling grid (the previous
    round's student, N_{r-1} steps), and dt doubles every round (1024 -> 512 -> ... steps).
    """
    if student_steps < 1 or teacher_steps < 1:
        raise ValueError(f"teacher_dt: steps must be positive (student {student_steps}, teacher {teacher_steps})")
    return (1.0 - sampling_eps) / (teacher_steps * student_steps)


def teacher_grid(t: Tensor, dt: float, m: int, t_min: float) -> Tensor:
    """float64 [B, m + 1]: t_j = max(t - j dt, t_min), j = 0..m.

    Clamping: a t drawn closer to 0 than m dt would step below zero. The grid stops at ``t_min``
    (the sampler's end time, diffusion.sampling_eps, > 0 so move_chance stays positive); a step
    with t_j = t_{j+1} = t_min is empty (no token can unmask: a_t - a_s = 0), exactly as sampling
    ends at sampling_eps. The first clamped step unmasks nearly everything (stay-masked chance
    a(t_min) / a(t_j)).
    """
    j = torch.arange(m + 1, dtype=torch.float64)
    return (t.double().cpu()[:, None] - j[None, :] * dt).clamp(min=t_min)


# --------------------------------------------------------------------------------------------------
# Teacher targets
# --------------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    log_probs: Tensor  # float32 [N, V]: the target of each of the N masked positions of x_t (row-major)
    step: Tensor  # int64 [B, L]: teacher step whose prediction is the target; -1 where x_t is visible
    x_final: Tensor  # int64 [B, L]: the teacher's sequence after its m steps


def _uniforms(shape: tuple[int, ...], batch: int, generator: Generators) -> Tensor:
    """float64 uniforms [batch, *shape] on the CPU; with one generator per sample, sample b's come
    from its own stream, so its draw does not depend on what else is in the batch."""
    if isinstance(generator, torch.Generator):
        return torch.rand((batch, *shape), generator=generator, dtype=torch.float64)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}")
    return torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in generator])


def _draw(log_p: Tensor, x: Tensor, t: Tensor, s: Tensor, mask_id: int, eps: float,
          generator: Generators) -> Tensor:
    """One ancestral step t -> s [B] from x [B, L] given the teacher's log p(x0 | x) [N, V] at the
    masked positions of x (``diffusion.ancestral_update``), its noise from one generator or one
    per sample."""
    return diffusion.ancestral_update(log_p, x, t, s, mask_id, eps, _uniforms((2, x.shape[1]), x.shape[0], generator))


@torch.no_grad()
def teacher_rollout(denoise: Denoiser, xt: Tensor, t: Tensor, dt: float, m: int, mask_id: int, eps: float,
                    generator: Generators, t_min: float = 1e-5) -> Rollout:
    """The teacher takes m ancestral steps t_0 = t -> t_1 -> ... -> t_m (``teacher_grid``) from x_t.

    Step j calls the teacher once on x_j (m denoiser calls in all) and draws x_{j+1}. The target of
    a position that is MASK in x_t is the teacher's log p(x0 | x_j) of the step j at which that
    position got unmasked; a position still masked after the last step gets the last call's
    prediction (j = m - 1). Visible positions of x_t have no target (no loss is taken there).
    ``generator``: one generator, or one per sample (batch-invariant draws).
    """
    if m < 1:
        raise ValueError(f"teacher_rollout: m={m} teacher steps, need at least 1")
    grid = teacher_grid(t, dt, m, t_min)
    masked0 = xt == mask_id
    # row[b, l]: the target row of position (b, l) among x_t's masked positions (row-major), -1 elsewhere
    row = torch.full(xt.shape, -1, dtype=torch.long, device=xt.device)
    row[masked0] = torch.arange(int(masked0.sum()), device=xt.device)
    x = xt
    step = torch.full(xt.shape, -1, dtype=torch.long, device=xt.device)
    early: list[tuple[Tensor, Tensor]] = []  # (target rows, their log p) of positions unmasked at steps < m - 1
    log_p, masked = None, masked0
    for j in range(m):
        log_p = denoise(x, grid[:, j].float())  # [N_j, V]: x_j's masked positions
        masked = x == mask_id
        x_next = _draw(log_p, x, grid[:, j], grid[:, j + 1], mask_id, eps, generator)
        unmasked_now = masked & (x_next != mask_id)
        if j < m - 1:
            early.append((row[unmasked_now], log_p[unmasked_now[masked]]))
        step[unmasked_now] = j
        x = x_next
    assert log_p is not None
    step[x == mask_id] = m - 1
    # The last call's prediction is the target of every position it saw masked (those still masked,
    # most of them at SDTT's small dt, and those it unmasked); the few unmasked earlier take theirs.
    target = torch.empty((int(masked0.sum()), log_p.shape[-1]), dtype=torch.float32, device=log_p.device)
    target[row[masked]] = log_p.float()
    for rows, values in early:
        target[rows] = values.float()
    return Rollout(target, step, x)


# --------------------------------------------------------------------------------------------------
# One deterministic training example
# --------------------------------------------------------------------------------------------------
def sample_seed(seed: int, round_idx: int, index: int) -> int:
    """A 63-bit seed from (seed, round, sample index) via numpy's SeedSequence (a proper hash:
    neighbouring indices give unrelated streams)."""
    state = np.random.SeedSequence([SEED_DOMAIN, seed, round_idx, index]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def sample_generator(seed: int, round_idx: int, index: int) -> torch.Generator:
    """The CPU generator that makes every random choice of sample ``index`` (same on any device)."""
    return torch.Generator().manual_seed(sample_seed(seed, round_idx, index))


@dataclass(frozen=True)
class ExampleSpec:
    """Everything besides x0 and the index that a training example depends on."""

    seed: int
    round_idx: int
    dt: float
    teacher_steps: int
    mask_id: int  # = vocabulary size V
    noise_eps: float
    train_eps: float  # t ~ U(train_eps, 1)
    t_min: float  # end of the teacher grid (diffusion.sampling_eps)
    codec: str
    k: int


@dataclass
class Example:
    index: int
    round_idx: int
    t: float
    xt: np.ndarray  # int32 [L], MASK = V
    fields: dict[str, np.ndarray]  # the codec's arrays for the M masked positions, in position order
    stats: dict[str, float] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """What meta.json holds: t is the float32 value the example used, written exactly."""
        return {"index": self.index, "round": self.round_idx, "t": self.t,
                "num_masked": int(self.stats.get("positions", 0))}


def make_examples(denoise: Denoiser, x0: Tensor, indices: Sequence[int], spec: ExampleSpec) -> list[Example]:
    """Build the examples of ``indices`` from their clean sequences x0 [B, L] (on the teacher's device).

    Sample i draws, from its own generator ``sample_generator(seed, round, i)`` and in this order:
    t ~ U(train_eps, 1) (one float64 uniform), its mask (L uniforms), the teacher's step noise
    (m x 2 x L uniforms, ``_draw``), then the codec's draws (sampled codec). No draw depends on the batch, so the
    example is a function of (x0, i, spec, teacher) alone -- provided the teacher's forward is
    batch-invariant, which batched matmuls are not to the last bit: the targets job therefore fixes
    the batch composition by index (trainer/targets/writer.py).
    """
    if x0.dim() != 2 or x0.shape[0] != len(indices):
        raise ValueError(f"make_examples: x0 {tuple(x0.shape)} does not match {len(indices)} indices")
    gens = [sample_generator(spec.seed, spec.round_idx, int(i)) for i in indices]
    x0 = x0.long()
    t = torch.cat([diffusion.sample_times(1, g, spec.train_eps, antithetic=False) for g in gens])
    xt = torch.cat([diffusion.mask_tokens(x0[b:b + 1], t[b:b + 1], spec.mask_id, spec.noise_eps, g)
                    for b, g in enumerate(gens)])
    roll = teacher_rollout(denoise, xt, t, spec.dt, spec.teacher_steps, spec.mask_id, spec.noise_eps, gens,
                           t_min=spec.t_min)
    coded = codecs.encode_rows(roll.log_probs, (xt == spec.mask_id).sum(1).tolist(), spec.codec, spec.k, gens)
    xt_host, t_host = xt.cpu().numpy().astype(np.int32), t.tolist()
    return [Example(int(i), spec.round_idx, t_host[b], xt_host[b], fields, codecs.stats(fields, spec.codec))
            for b, (i, fields) in enumerate(zip(indices, coded))]

