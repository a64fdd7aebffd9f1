"""Pure SDTT math: the teacher's m-step targets, one deterministic training example, and the
divergences between a student and dense or sparse (coded) targets.

Method facts: the SDTT paper (Deschenaux & Gulcehre, 2024) and MDLM (Sahoo et al., 2024). Two
defects of the public reference code are deliberately NOT reproduced here:
* the teacher's intermediate times are t, t - dt, ..., t - m dt (``teacher_grid``), not a mix of
  t_start and t_end with swapped weights;
* "tvd" is the total variation 1/2 sum_v |p_v - q_v| between probabilities, not an L1 distance
  between log-probabilities.
Categoricals are drawn in float64 (trainer.method.diffusion), randomness only from explicit generators.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from trainer.method import codecs, diffusion

Denoiser = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator]
DIVERGENCES = ("rkl", "fkl", "mse", "tvd")
# Which divergences each codec can serve. The sampled code is an unbiased estimate of the teacher
# distribution with zeros off the sampled ids: forward KL (cross-entropy against the estimate) stays
# unbiased in its gradient; reverse KL and MSE would need the teacher's log-prob wherever the student
# has mass (infinite at the zeros), and TV of the estimate is biased (|.| is not linear).
# topk_is: its tail draws estimate the within-tail KL of either direction; TV and MSE have no such estimate.
SUPPORTED: dict[str, tuple[str, ...]] = {"dense": DIVERGENCES, "topk": DIVERGENCES, "topk_is": ("rkl", "fkl"),
                                         "sampled": ("fkl",)}
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


def make_example(x0: Tensor, index: int, seed: int, round_idx: int, denoise: Denoiser, **spec: Any) -> Example:
    """One example (x0: [L]); ``spec`` holds the other ExampleSpec fields. Same result as the
    corresponding entry of a batched ``make_examples`` call (given a batch-invariant teacher)."""
    return make_examples(denoise, x0[None], [index], ExampleSpec(seed=seed, round_idx=round_idx, **spec))[0]


# --------------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------------
def _finite(x: Tensor) -> Tensor:
    return x > -math.inf


def _plogq_terms(lp: Tensor, lq: Tensor) -> Tensor:
    """Elementwise p (log p - log q) with 0 where p = 0; +inf where p > 0 = q. NaN-free gradients
    (the 'double where': the unused branch never sees -inf)."""
    ok = _finite(lp)
    safe_lp = torch.where(ok, lp, torch.zeros_like(lp))
    terms = torch.exp(safe_lp) * (safe_lp - lq)
    return torch.where(ok, terms, torch.zeros_like(terms))


def _column_divergence(ls: Tensor, lt: Tensor, width: Tensor, kind: str, vocab: int) -> Tensor:
    """Per-position divergence over C columns, each standing for ``width`` tokens of the vocabulary
    (1 for a single token, V - K for a lumped tail) with the column's total log-mass in ls / lt.

    Inside a lumped column both distributions are taken as uniform, so the per-token log-prob is
    log(mass / width) for both and the MSE difference is ls - lt, counted ``width`` times.
    """
    if kind == "rkl":  # KL(student || teacher)
        return _plogq_terms(ls, lt).sum(-1)
    if kind == "fkl":  # KL(teacher || student)
        return _plogq_terms(lt, ls).sum(-1)
    if kind == "tvd":  # 1/2 sum |p - q| on probabilities (not on log-probs)
        return 0.5 * (torch.exp(ls) - torch.exp(lt)).abs().sum(-1)
    if kind == "mse":  # mean over the vocabulary of the squared log-prob difference
        use = width > 0
        d = torch.where(use, ls - lt, torch.zeros_like(ls))  # empty tail column: -inf - -inf
        return (width * d * d).sum(-1) / vocab
    raise ValueError(f"unknown divergence '{kind}' (expected one of {', '.join(DIVERGENCES)})")


def dense_divergence(student_lp: Tensor, teacher_lp: Tensor, kind: str) -> Tensor:
    """Per-position divergence [...] between log-prob rows [..., V] (real tokens only: drop the
    MASK column first, where both sides are -inf).

    rkl: sum_v s_v (log s_v - log t_v)  (SDTT's default)      fkl: sum_v t_v (log t_v - log s_v)
    mse: (1/V) sum_v (log s_v - log t_v)^2                    tvd: 1/2 sum_v |s_v - t_v|
    MSE needs finite log-probs on both sides.
    """
    if student_lp.shape != teacher_lp.shape:
        raise ValueError(f"student {tuple(student_lp.shape)} and teacher {tuple(teacher_lp.shape)} differ")
    lt = teacher_lp.to(student_lp.dtype)
    return _column_divergence(student_lp, lt, torch.ones((), dtype=student_lp.dtype, device=student_lp.device),
                              kind, student_lp.shape[-1])


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of per-position values over the positions where ``mask`` is true (all if None);
    0 when there are none (a batch with nothing masked contributes no loss)."""
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    picked = torch.where(mask, values, torch.zeros_like(values))
    return picked.sum() / mask.sum().clamp(min=1)


def divergence(student_lp: Tensor, teacher_lp: Tensor, kind: str = "rkl", mask: Tensor | None = None) -> Tensor:
    """Mean dense divergence over masked positions; inputs [..., V], mask [...] (e.g. xt == MASK)."""
    return masked_mean(dense_divergence(student_lp, teacher_lp, kind), mask)


def check_pairing(codec: str, kind: str) -> None:
    """Refuse a codec/divergence pair the code cannot serve, with the reason."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{kind}' (expected one of {', '.join(DIVERGENCES)})")
    if kind not in SUPPORTED.get(codec, ()):
        raise ValueError(f"divergence '{kind}' cannot be computed from '{codec}' targets (supported: "
                         f"{', '.join(SUPPORTED[codec])}): a sampled code is zero off its sampled ids, so "
                         "reverse KL and MSE are infinite and TV is biased; topk_is estimates only the KLs' "
                         "tail term; use a supported divergence or targets.codec=topk")


def lump_student(student_lp: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The student's log-probs at the stored ids [N, K] and the log of its mass on all other
    tokens [N] (a log-sum-exp over them, -inf when K = V; never 1 - sum, which cancels)."""
    stored = student_lp.gather(-1, ids)
    if ids.shape[-1] >= student_lp.shape[-1]:
        # No tail: a constant -inf (a log-sum-exp over nothing but -inf has a NaN gradient).
        return stored, torch.full(stored.shape[:-1], -math.inf, dtype=stored.dtype, device=stored.device)
    rest = student_lp.scatter(-1, ids, -math.inf)
    return stored, torch.logsumexp(rest, dim=-1)


def sparse_divergence(student_lp: Tensor, targets: codecs.Targets, kind: str = "rkl") -> Tensor:
    """Per-position divergence [N] between student log-probs [N, V] at the masked positions (row-major, as
    ``diffusion.masked_log_probs`` of ``DiT(rows=xt == MASK)``) and coded targets.

    dense: ``dense_divergence`` on the stored log-probs.

    topk: both distributions are coarse-grained onto the K stored ids plus ONE tail bucket (the other
    V - K tokens): the teacher's bucket holds its stored residual mass (spread uniformly by decode),
    the student's holds its total mass on those tokens. Every divergence is then the dense one
    between the two coarse-grained distributions, e.g. for the default reverse KL

        sum_{v in top-K} s_v log(s_v / t_v) + s_tail log(s_tail / t_tail).

    Why grouped rather than "student per token against a uniform teacher tail": the latter adds
    s_tail (log(V - K) - H(student | tail)) >= 0, which pushes the student to flatten its tail into
    the uniform shape the code merely assumed (raising entropy for nothing). Grouped, the student's
    tail shape is free and only its tail mass is matched. By the data-processing inequality the
    grouped KL is a lower bound of the true KL; equal when K = V (no tail), where every topk
    divergence equals its dense definition exactly. Equivalently: the dense divergence between
    ``targets.to_dense()`` and the student with its tail mass spread uniformly (``tests``).

    topk_is: the topk divergence (rkl or fkl) plus ``tail_shape_term``, an unbiased estimate of the
    within-tail KL that the bucket drops, from the stored draws of the teacher's tail: the sum is an
    unbiased estimate of the dense KL, and sees how the student spreads its tail (review F3).

    sampled: only fkl: sum_v p_hat_v (log p_hat_v - log s_v) with p_hat = counts / K. Its gradient
    (the cross-entropy against p_hat) is unbiased for the dense forward KL's, since E[p_hat] = p;
    its value differs from KL(p || s) by a student-independent offset (E[sum p_hat log p_hat]
    >= sum p log p).
    """
    if isinstance(targets, codecs.DenseTargets):
        return dense_divergence(student_lp, targets.logp.to(student_lp.device), kind)
    if isinstance(targets, codecs.TopKISTargets):
        check_pairing("topk_is", kind)
        coarse = _topk_divergence(student_lp, targets, kind)
        return coarse + tail_shape_term(student_lp, targets, kind)
    if isinstance(targets, codecs.TopKTargets):
        return _topk_divergence(student_lp, targets, kind)
    if isinstance(targets, codecs.SampledTargets):
        check_pairing("sampled", kind)
        ids = targets.ids.to(student_lp.device)
        w = targets.weight.to(student_lp)
        lt = torch.where(w > 0, torch.log(w.clamp(min=1e-30)), torch.full_like(w, -math.inf))
        return _plogq_terms(lt, student_lp.gather(-1, ids)).sum(-1)
    raise TypeError(f"sparse_divergence: unknown targets type {type(targets).__name__}")


def _topk_divergence(student_lp: Tensor, targets: codecs.TopKTargets, kind: str) -> Tensor:
    """The divergence between the student and the teacher coarse-grained onto the K stored ids + one tail bucket."""
    ids = targets.ids.to(student_lp.device)
    ls, ls_tail = lump_student(student_lp, ids)
    lt = targets.logp.to(student_lp)
    lt_tail = targets.logtail.to(student_lp)
    n_tail = targets.vocab - ids.shape[-1]
    if n_tail == 0:  # no bucket: keep both sides at -inf there (zero mass)
        lt_tail = torch.full_like(lt_tail, -math.inf)
    width = torch.ones(ids.shape[-1] + 1, dtype=student_lp.dtype, device=student_lp.device)
    width[-1] = n_tail
    return _column_divergence(torch.cat([ls, ls_tail[:, None]], -1), torch.cat([lt, lt_tail[:, None]], -1),
                              width, kind, targets.vocab)


def tail_shape_term(student_lp: Tensor, targets: codecs.TopKISTargets, kind: str) -> Tensor:
    """The within-tail term that the coarse-grained top-K divergence drops, estimated from the stored
    tail draws v_1..v_J ~ t~ (the teacher's law renormalised over the non-stored ids) [N].

    The chain rule of KL splits each dense KL exactly into the coarse-grained one (K ids + bucket)
    plus the bucket's mass times the KL between the two distributions *inside* the tail:

        KL(s || t) = KL_coarse + s_tail KL(s~ || t~),   KL(t || s) = KL_coarse + t_tail KL(t~ || s~).

    With rho = s~ / t~ (so E_t~[rho] = 1): KL(s~ || t~) = E_t~[rho log rho - rho + 1] and
    KL(t~ || s~) = E_t~[rho - 1 - log rho]. The mean over the J draws is an unbiased estimate of each
    (of its value and of its gradient), and every term is >= 0, so a student that piles its tail
    onto a few ids pays for every draw that lands elsewhere (rho ~ 0 costs 1 per draw in rkl), which
    the bucket cannot see. Zero when K = V (no tail: the coded loss is then exactly dense).
    """
    if kind not in ("rkl", "fkl"):
        raise ValueError(f"tail_shape_term: no tail estimate for '{kind}' (rkl or fkl)")
    ids = targets.ids.to(student_lp.device)
    tids = targets.tail_ids.to(student_lp.device)
    lt_draw = targets.tail_logp.to(student_lp)
    lt_tail = targets.logtail.to(student_lp)
    _, ls_tail = lump_student(student_lp, ids)
    ok = _finite(lt_draw) & _finite(lt_tail)[:, None] & _finite(ls_tail)[:, None]
    zero = torch.zeros_like(lt_draw)
    # log rho = log(s_v / s_tail) - log(t_v / t_tail), with the unused branch kept finite (no NaN gradient).
    log_rho = torch.where(ok, (student_lp.gather(-1, tids) - torch.where(ok, ls_tail[:, None], zero))
                          - (torch.where(ok, lt_draw, zero) - torch.where(ok, lt_tail[:, None], zero)), zero)
    # A student with an exactly-zero tail probability (log -inf) would make 0 * log 0 a NaN: bound log rho
    # (exp(-100) is zero for every purpose; a log_softmax student is never that small in float32).
    log_rho = log_rho.clamp(min=-100.0)
    rho = torch.exp(log_rho)
    if kind == "rkl":
        per_draw = rho * log_rho - rho + 1.0
        weight = torch.exp(torch.where(_finite(ls_tail), ls_tail, torch.full_like(ls_tail, -math.inf)))
    else:
        per_draw = rho - 1.0 - log_rho
        weight = torch.exp(lt_tail)
    per_draw = torch.where(ok, per_draw, zero)
    n_ok = ok.sum(-1).clamp(min=1)
    return weight * per_draw.sum(-1) / n_ok
