"""The tail-aware sparse code (topk_is): top-K + importance-sampled tail ids (review F3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.method import codecs as C
from trainer.method import divergences as Dv


def _teacher_student(n: int = 2000, vocab: int = 64, seed: int = 0, noise: float = 1.0):
    """Random teacher rows with heavy tails and a student = teacher + logit noise (the review's check)."""
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 1.5
    s_logits = t_logits + noise * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    return torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)


def _code(t: torch.Tensor, codec: str, k: int, seed: int = 0):
    gens = [torch.Generator().manual_seed(seed * 100003 + i) for i in range(t.shape[0])]
    fields = C.encode_rows(t.float(), [1] * t.shape[0], codec, k, gens)
    joined = {f: np.concatenate([x[f] for x in fields]) for f in C.get(codec).fields}
    return C.decode(joined, codec, t.shape[1], k)


def _collapse_tail(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Move all of the student's mass off the stored ids onto its single largest tail token."""
    p = s.exp()
    tail = torch.ones_like(p, dtype=torch.bool).scatter_(-1, ids, False)
    mass = (p * tail).sum(-1)
    top_tail = torch.where(tail, p, torch.full_like(p, -1.0)).argmax(-1)
    q = torch.where(tail, torch.zeros_like(p), p)
    q[torch.arange(p.shape[0]), top_tail] = mass
    return torch.log(q)


def test_fields_shapes_and_bytes():
    _, t = _teacher_student(n=5, vocab=16)
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    f = C.encode_rows(t.float(), [2, 3], "topk_is", 4, gens[:2])
    assert [x["tail_ids"].shape for x in f] == [(2, 4), (3, 4)]
    assert f[0]["tail_ids"].dtype == np.uint16 and f[0]["tail_logp"].dtype == np.float16
    assert C.bytes_per_position("topk_is", 4, 16) == 2 * 4 * 4 + 4
    # the tail draws never hit a stored id, and carry the teacher's log-prob there
    for x, rows in zip(f, (t[:2], t[2:5])):
        assert not np.isin(x["tail_ids"], x["ids"]).any(axis=None) or all(
            not set(a) & set(b) for a, b in zip(x["tail_ids"].tolist(), x["ids"].tolist()))
        ref = rows.gather(-1, torch.from_numpy(x["tail_ids"].astype(np.int64))).numpy()
        assert np.allclose(x["tail_logp"].astype(np.float64), ref, atol=2e-2)
    with pytest.raises(C.CodecError, match="topk_is"):
        C.encode(t.float(), "topk_is", 4)  # no generator


def test_equal_to_dense_at_k_equal_v():
    s, t = _teacher_student(n=50, vocab=16)
    code = _code(t, "topk_is", 16)
    for kind in ("rkl", "fkl"):
        dense = Dv.dense_divergence(s, t, kind)
        coded = Dv.sparse_divergence(s, code, kind)
        assert torch.allclose(coded.double(), dense, atol=2e-3, rtol=1e-3), kind  # fp16 stored log-probs


@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_unbiased_for_the_dense_kl(kind):
    """Averaged over independent tail draws, the coded KL is the dense KL of the same teacher."""
    s, t = _teacher_student(n=40, vocab=32, seed=3)
    dense = Dv.dense_divergence(s, t, kind)
    est = torch.stack([Dv.sparse_divergence(s, _code(t, "topk_is", 4, seed=r), kind) for r in range(300)]).mean(0)
    bucket = Dv.sparse_divergence(s, _code(t, "topk", 4), kind)
    # the bucket alone is biased low by the whole within-tail term; the estimate is not
    assert (dense - bucket).mean() > 0.05
    assert abs(float((est.double() - dense).mean())) < 0.1 * float((dense - bucket).mean())


def test_sees_a_collapsed_student_tail_where_the_bucket_does_not():
    """The review's F3 example: V = 64, K = 8, student = teacher + logit noise, tail collapsed onto one id."""
    s, t = _teacher_student()
    topk, topk_is = _code(t, "topk", 8), _code(t, "topk_is", 8)
    collapsed = _collapse_tail(s, topk.ids)
    dense_before = Dv.dense_divergence(s, t, "rkl").mean()
    dense_after = Dv.dense_divergence(collapsed, t, "rkl").mean()
    bucket_before = Dv.sparse_divergence(s, topk, "rkl").mean()
    bucket_after = Dv.sparse_divergence(collapsed, topk, "rkl").mean()
    is_before = Dv.sparse_divergence(s, topk_is, "rkl").mean()
    is_after = Dv.sparse_divergence(collapsed, topk_is, "rkl").mean()
    assert dense_after > dense_before + 0.5  # collapsing is costly in truth
    assert torch.isclose(bucket_after, bucket_before, rtol=1e-5)  # and invisible to the bucket
    assert is_after > is_before + 0.25 * (dense_after - dense_before)  # the tail draws see it
    assert abs(float(is_before - dense_before)) < 0.25 * float(dense_before - bucket_before) + 0.02


@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_gradients_are_finite_and_push_against_collapse(kind):
    s, t = _teacher_student(n=20, vocab=16, seed=4)
    code = _code(t, "topk_is", 4)
    logits = _collapse_tail(s, code.ids).clamp(min=-30).detach().clone().requires_grad_(True)
    Dv.sparse_divergence(torch.log_softmax(logits, -1), code, kind).mean().backward()
    assert torch.isfinite(logits.grad).all()
    for k in (4, 16):  # and with no tail at all
        c = _code(t, "topk_is", k)
        lg = torch.randn(20, 16, requires_grad=True)
        Dv.sparse_divergence(torch.log_softmax(lg, -1), c, kind).mean().backward()
        assert torch.isfinite(lg.grad).all()


def test_pairing_is_refused_for_tv_and_mse():
    _, t = _teacher_student(n=3, vocab=8)
    code = _code(t, "topk_is", 2)
    with pytest.raises(ValueError, match="topk_is"):
        Dv.sparse_divergence(t, code, "mse")
    with pytest.raises(ConfigError, match="distill.divergence"):
        load_config(None, ["targets.codec=topk_is", "distill.divergence=tvd"])
    load_config(None, ["targets.codec=topk_is", "distill.divergence=rkl"])
