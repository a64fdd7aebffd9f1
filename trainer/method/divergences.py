"""The divergences between a student and its teacher's targets, dense or coded (trainer/method/codecs/):
what the student is trained against, and which codec can serve which divergence.

Method facts: the SDTT paper (Deschenaux & Gulcehre, 2024). "tvd" is the total variation
1/2 sum_v |p_v - q_v| between probabilities, not the public reference code's L1 distance between
log-probabilities.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from trainer.config import PAIRS, Divergence, choice_names

DIVERGENCES = choice_names(Divergence)  # declared in trainer/config.py, as is the pairing below
# Which divergences each codec can serve, with the reasons: trainer/config.py PAIRS.
SUPPORTED: dict[str, tuple[str, ...]] = {codec.value: choice_names(served) for codec, served in PAIRS.items()}


# What the divergences read of a codec's decoded targets (trainer/method/codecs/), by field: the
# codecs import this module, never the other way round.
class CodedTargets(Protocol):
    codec: str  # its name in trainer.config.Codec

    def divergence(self, student_lp: Tensor, kind: str) -> Tensor: ...


class TopKFields(Protocol):
    ids: Tensor  # int64 [N, K]
    logp: Tensor  # [N, K]
    logtail: Tensor  # [N]
    vocab: int


class TailDraws(TopKFields, Protocol):
    tail_ids: Tensor  # int64 [N, J]
    tail_logp: Tensor  # [N, J]


class SampledFields(Protocol):
    ids: Tensor  # int64 [N, U]
    weight: Tensor  # [N, U]: count / draws


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


def sparse_divergence(student_lp: Tensor, targets: CodedTargets, kind: str = "rkl") -> Tensor:
    """Per-position divergence [N] between student log-probs [N, V] at the masked positions (row-major, as
    ``diffusion.masked_log_probs`` of ``DiT(rows=xt == MASK)``) and coded targets, after refusing a
    pair their codec cannot serve (``check_pairing``). Each codec's targets say which of the
    functions below they use (``Targets.divergence``, trainer/method/codecs/):

    dense: ``dense_divergence`` on the stored log-probs.

    topk (``topk_divergence``): both distributions are coarse-grained onto the K stored ids plus ONE
    tail bucket (the other V - K tokens): the teacher's bucket holds its stored residual mass (spread
    uniformly by decode), the student's holds its total mass on those tokens. Every divergence is
    then the dense one between the two coarse-grained distributions, e.g. for the default reverse KL

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

    sampled (``sampled_fkl``): only fkl: sum_v p_hat_v (log p_hat_v - log s_v) with p_hat = counts / K.
    Its gradient (the cross-entropy against p_hat) is unbiased for the dense forward KL's, since E[p_hat] = p;
    its value differs from KL(p || s) by a student-independent offset (E[sum p_hat log p_hat]
    >= sum p log p).
    """
    check_pairing(targets.codec, kind)
    return targets.divergence(student_lp, kind)


def sampled_fkl(student_lp: Tensor, targets: SampledFields) -> Tensor:
    """Forward KL [N] against the sampled estimate p_hat (``sparse_divergence``: its only divergence)."""
    ids = targets.ids.to(student_lp.device)
    w = targets.weight.to(student_lp)
    lt = torch.where(w > 0, torch.log(w.clamp(min=1e-30)), torch.full_like(w, -math.inf))
    return _plogq_terms(lt, student_lp.gather(-1, ids)).sum(-1)


def topk_divergence(student_lp: Tensor, targets: TopKFields, kind: str) -> Tensor:
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


def tail_shape_term(student_lp: Tensor, targets: TailDraws, kind: str) -> Tensor:
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
