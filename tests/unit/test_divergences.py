"""trainer/method/divergences.py: the divergences on dense and coded targets, and the codec <->
divergence pairing."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.method import codecs as C
from trainer.method import divergences as Dv


def _pair(n=6, vocab=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(1.5 * torch.randn(n, vocab, generator=g, dtype=dtype), -1)
    t = torch.log_softmax(1.5 * torch.randn(n, vocab, generator=g, dtype=dtype), -1)
    return s, t


def test_dense_divergences_match_their_definitions():
    s, t = _pair()
    p, q = s.exp(), t.exp()
    assert torch.allclose(Dv.dense_divergence(s, t, "rkl"), (p * (s - t)).sum(-1))
    assert torch.allclose(Dv.dense_divergence(s, t, "fkl"), (q * (t - s)).sum(-1))
    assert torch.allclose(Dv.dense_divergence(s, t, "mse"), ((s - t) ** 2).mean(-1))
    tvd = Dv.dense_divergence(s, t, "tvd")
    assert torch.allclose(tvd, 0.5 * (p - q).abs().sum(-1))
    assert (tvd <= 1).all() and not torch.allclose(tvd, (s - t).abs().sum(-1))  # not L1 of log-probs
    for kind in Dv.DIVERGENCES:
        assert (Dv.dense_divergence(s, t, kind) > 0).all()
        assert torch.allclose(Dv.dense_divergence(s, s, kind), torch.zeros(6, dtype=s.dtype))
    with pytest.raises(ValueError, match="unknown divergence"):
        Dv.dense_divergence(s, t, "l1")


def test_masked_mean():
    vals = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert Dv.masked_mean(vals, mask).item() == pytest.approx((1 + 3 + 6) / 3)
    assert Dv.masked_mean(vals, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("kind", Dv.DIVERGENCES)
def test_sparse_with_k_equal_v_is_the_dense_divergence(kind):
    s, t = _pair(vocab=12)
    for codec in ("topk", "dense"):
        fields = C.encode(t, codec, 12)
        targets = C.decode(fields, codec, 12, 12)
        decoded = targets.to_dense().double()  # the fp16-rounded teacher for topk
        sparse = Dv.sparse_divergence(s, targets, kind)
        dense = Dv.dense_divergence(s, decoded, kind)
        assert torch.allclose(sparse, dense, rtol=1e-12, atol=1e-12), (codec, kind)


def _lumped_student(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student with its mass off the stored ids spread uniformly there."""
    vocab, k = s.shape[-1], ids.shape[-1]
    tail = Dv.lump_student(s, ids)[1] - math.log(vocab - k)
    return tail[:, None].expand_as(s).clone().scatter_(-1, ids, s.gather(-1, ids))


@pytest.mark.parametrize("kind", Dv.DIVERGENCES)
def test_topk_divergence_is_the_dense_one_between_coarse_grained_distributions(kind):
    s, t = _pair(vocab=12, seed=3)
    targets = C.decode(C.encode(t, "topk", 4), "topk", 12, 4)
    sparse = Dv.sparse_divergence(s, targets, kind)
    dense = Dv.dense_divergence(_lumped_student(s, targets.ids), targets.to_dense().double(), kind)
    assert torch.allclose(sparse, dense, rtol=1e-6, atol=1e-9)  # fp32 per-token tail in to_dense


def test_topk_reverse_kl_groups_the_student_tail():
    s, t = _pair(vocab=12, seed=4)
    targets = C.decode(C.encode(t, "topk", 4), "topk", 12, 4)
    # a lower bound of the true reverse KL (data processing), against the same decoded teacher
    full = Dv.dense_divergence(s, targets.to_dense().double(), "rkl")
    assert (Dv.sparse_divergence(s, targets, "rkl") <= full + 1e-12).all()
    # reshaping the student inside the tail (same tail mass) does not change the loss ...
    others = torch.ones_like(s, dtype=torch.bool).scatter_(-1, targets.ids, False)
    p = s.exp()
    reshaped = p.clone()
    tail_p = p[others].view(6, -1)
    new_tail = torch.softmax(torch.randn(tail_p.shape, dtype=s.dtype), -1) * tail_p.sum(-1, keepdim=True)
    reshaped[others] = new_tail.flatten()
    assert torch.allclose(Dv.sparse_divergence(reshaped.log(), targets, "rkl"), Dv.sparse_divergence(s, targets, "rkl"))
    # ... so its gradient leaves the within-tail shape alone (finite, no NaN anywhere)
    logits = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    Dv.sparse_divergence(torch.log_softmax(logits, -1), targets, "rkl").sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("kind", Dv.DIVERGENCES)
def test_gradients_are_finite_with_and_without_a_tail(kind):
    _, t = _pair(vocab=12, seed=5)
    for k in (3, 12):
        targets = C.decode(C.encode(t, "topk", k), "topk", 12, k)
        logits = torch.randn(6, 12, requires_grad=True)
        Dv.sparse_divergence(torch.log_softmax(logits, -1), targets, kind).mean().backward()
        assert torch.isfinite(logits.grad).all(), (kind, k)


def test_sampled_targets_serve_forward_kl_only_and_unbiasedly():
    s, t = _pair(n=3, vocab=8, seed=6)
    fields = C.encode(t, "sampled", 6, torch.Generator().manual_seed(0))
    targets = C.decode(fields, "sampled", 8, 6)
    # the pairing: exactly the dense forward KL against the decoded estimate p_hat
    p_hat = targets.to_dense().double()
    assert torch.allclose(Dv.sparse_divergence(s, targets, "fkl"), Dv.dense_divergence(s, p_hat, "fkl"), atol=1e-6)
    for kind in ("rkl", "mse", "tvd"):
        with pytest.raises(ValueError, match="sampled"):
            Dv.sparse_divergence(s, targets, kind)
    # the gradient w.r.t. the student logits is softmax - p_hat, linear in p_hat ...
    logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    Dv.sparse_divergence(torch.log_softmax(logits, -1), targets, "fkl").sum().backward()
    assert torch.allclose(logits.grad, torch.softmax(logits, -1) - p_hat.exp(), atol=1e-6)
    # ... so it is unbiased, since E[p_hat] = p: average over many codes (one row per draw set)
    n = 4000
    many = C.decode(C.encode(t.repeat(n, 1), "sampled", 6, torch.Generator().manual_seed(1)), "sampled", 8, 6)
    mean_p_hat = many.to_dense().double().exp().view(n, 3, 8).mean(0)
    sd = (t.exp() * (1 - t.exp()) / (6 * n)).sqrt()
    assert ((mean_p_hat - t.exp()).abs() <= 5 * sd + 1e-12).all()


def test_pairing_check_and_config_validation():
    Dv.check_pairing("topk", "rkl")
    with pytest.raises(ValueError, match="sampled"):
        Dv.check_pairing("sampled", "rkl")
    from trainer.config import ConfigError, load_config

    load_config(None, ["targets.codec=sampled", "distill.divergence=fkl"])
    with pytest.raises(ConfigError, match="distill.divergence"):
        load_config(None, ["targets.codec=sampled"])  # default divergence is rkl
