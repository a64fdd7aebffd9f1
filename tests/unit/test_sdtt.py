"""trainer/method/sdtt.py: the teacher's time grid and target assignment, deterministic examples, and the
divergences on dense and coded targets (the codec <-> divergence pairing lives here)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.method import codecs as C
from trainer.method import diffusion as D
from trainer.method import divergences as Dv
from trainer.method import sdtt as S

EPS = 1e-3
V = 10
MASK = V


# --------------------------------------------------------------------------------------------------
# Time grid
# --------------------------------------------------------------------------------------------------
def test_teacher_dt_doubles_every_round():
    # start 1024, m = 2: round 1 student 512 steps, teacher steps on the 1024-step grid
    assert S.teacher_dt(512, 2, 1e-5) == pytest.approx((1 - 1e-5) / 1024)
    assert S.teacher_dt(256, 2, 1e-5) == pytest.approx(2 * S.teacher_dt(512, 2, 1e-5))
    # one student step covers the m teacher steps
    assert 4 * S.teacher_dt(64, 4, 1e-5) == pytest.approx((1 - 1e-5) / 64)


def test_teacher_grid_is_t_minus_j_dt_clamped():
    grid = S.teacher_grid(torch.tensor([0.5, 0.15, 0.05]), dt=0.1, m=2, t_min=1e-5)
    expected = torch.tensor([[0.5, 0.4, 0.3], [0.15, 0.05, 1e-5], [0.05, 1e-5, 1e-5]], dtype=torch.float64)
    assert grid.dtype == torch.float64
    assert torch.allclose(grid, expected, atol=1e-7)  # t is float32 -> float64


def test_first_step_unmasks_the_right_fraction():
    """The reference code's grid bug made the first step land at the wrong time; ours lands at t - dt,
    so a masked token unmasks with probability (a(t) - a(t - dt)) / a(t)."""
    L = 20000
    uniform = lambda x, t: D.masked_log_probs(torch.zeros(int((x == MASK).sum()), V + 1), MASK)  # noqa: E731
    xt = torch.full((1, L), MASK)
    t, dt = torch.tensor([0.5]), 0.2
    roll = S.teacher_rollout(uniform, xt, t, dt, 1, MASK, EPS, torch.Generator().manual_seed(0))
    frac = (roll.x_final != MASK).float().mean().item()
    expected = (D.move_chance(torch.tensor(0.5), EPS) - D.move_chance(torch.tensor(0.3), EPS)) / D.move_chance(
        torch.tensor(0.5), EPS)
    assert frac == pytest.approx(expected.item(), abs=4 * math.sqrt(0.4 * 0.6 / L))


def test_teacher_step_has_the_ancestral_law_and_is_batch_invariant():
    """sdtt._draw (two float64 uniforms per position) draws the ancestral law: MASK with probability
    a_s / a_t, else v with p(v) (a_t - a_s) / a_t; visible positions are kept; with one generator per
    sample a sample's draw does not depend on the batch."""
    L = 60000
    logits = 1.5 * torch.randn(V + 1, generator=torch.Generator().manual_seed(1))
    xt = torch.full((1, L), MASK)
    xt[0, :50] = 3
    log_p = D.masked_log_probs(logits.expand(L, V + 1)[50:], MASK)  # the masked positions 50 .. L - 1
    t, s = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    x = S._draw(log_p, xt, t, s, MASK, EPS, torch.Generator().manual_seed(0))
    assert torch.equal(x[0, :50], xt[0, :50])
    a_t, a_s = D.move_chance(t, EPS), D.move_chance(s, EPS)
    law = torch.cat([log_p[0].double().exp() * (a_t - a_s) / a_t, a_s / a_t])
    freq = torch.bincount(x[0, 50:], minlength=V + 1).double() / (L - 50)
    tol = 4 * torch.sqrt(law * (1 - law) / (L - 50)) + 1e-12
    assert torch.all((freq - law).abs() <= tol), (freq, law)
    gens = lambda: [torch.Generator().manual_seed(10 + b) for b in range(3)]  # noqa: E731
    x3 = torch.full((3, 16), MASK)
    lp3 = D.masked_log_probs(torch.randn(48, V + 1, generator=torch.Generator().manual_seed(2)), MASK)
    t3, s3 = torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 0.1, dtype=torch.float64)
    together = S._draw(lp3, x3, t3, s3, MASK, EPS, gens())
    alone = [S._draw(lp3[16 * b:16 * (b + 1)], x3[b:b + 1], t3[b:b + 1], s3[b:b + 1], MASK, EPS, [gens()[b]])
             for b in range(3)]
    assert torch.equal(together, torch.cat(alone))


class ScriptedTeacher:
    """Call j predicts token j with certainty-ish (so a target tells which call produced it) and
    records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t):
        j = len(self.calls)
        self.calls.append((x.clone(), t.clone()))
        logits = -((torch.arange(V + 1, dtype=torch.float32) - j) ** 2).expand(*x.shape, V + 1)
        return D.masked_log_probs(logits[x == MASK], MASK)


def test_targets_come_from_the_step_that_unmasked_each_position(monkeypatch):
    # positions 0-3 masked, 4-5 visible; forced unmasking: step 0 reveals 1, step 1 reveals 0 and 3,
    # step 2 reveals nothing -> 2 keeps the last call's prediction.
    xt = torch.tensor([[MASK, MASK, MASK, MASK, 7, 8]])
    script = {0: [1], 1: [0, 3], 2: []}
    step_no = iter(range(3))

    def forced_draw(log_p, x, *_):
        j = next(step_no)
        assert log_p.shape == (int((x == MASK).sum()), V)  # the denoiser's rows: x's masked positions
        out = x.clone()
        for pos in script[j]:
            out[0, pos] = 5
        return out

    monkeypatch.setattr(S, "_draw", forced_draw)
    teacher = ScriptedTeacher()
    t = torch.tensor([0.9])
    roll = S.teacher_rollout(teacher, xt, t, 0.1, 3, MASK, EPS, torch.Generator())
    assert roll.step.tolist() == [[1, 0, 2, 1, -1, -1]]
    assert roll.log_probs.shape == (4, V)  # one target row per masked position of x_t, in order
    made_by = roll.log_probs.argmax(-1).tolist()  # call j predicts token j
    assert made_by == [1, 0, 2, 1]
    assert roll.x_final.tolist() == [[5, 5, MASK, 5, 7, 8]]
    # m calls, on the states x_0, x_1, x_2, at times t, t - dt, t - 2 dt
    assert len(teacher.calls) == 3
    assert [c[1].item() for c in teacher.calls] == pytest.approx([0.9, 0.8, 0.7], abs=1e-6)
    assert teacher.calls[1][0].tolist() == [[MASK, 5, MASK, MASK, 7, 8]]
    assert teacher.calls[2][0].tolist() == [[5, 5, MASK, 5, 7, 8]]


def test_student_equal_to_teacher_with_one_step_has_zero_loss():
    teacher = _mixing_teacher(seed=0)
    x0 = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    t = torch.tensor([0.3, 0.6, 0.9])
    xt = D.mask_tokens(x0, t, MASK, EPS, gen)
    target = S.teacher_rollout(teacher, xt, t, 0.05, 1, MASK, EPS, gen).log_probs
    student = teacher(xt, t)
    for kind in Dv.DIVERGENCES:
        loss = Dv.divergence(student, target, kind)
        assert loss.item() == pytest.approx(0.0, abs=1e-6), kind


# --------------------------------------------------------------------------------------------------
# Deterministic examples
# --------------------------------------------------------------------------------------------------
def _mixing_teacher(seed=0, vocab=V, length=64):
    """A batch-invariant (elementwise + per-row) fake denoiser whose output depends on the context."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(vocab + 1, vocab + 1, generator=g)
    pos = torch.randn(length, vocab + 1, generator=g)

    def denoise(x, t):
        left = torch.roll(x, 1, dims=1)
        logits = 2 * emb[x] + emb[left] + pos[: x.shape[1]]
        return D.masked_log_probs(logits[x == vocab], vocab)

    return denoise


def _spec(**kw):
    base = dict(seed=7, round_idx=2, dt=0.02, teacher_steps=2, mask_id=MASK, noise_eps=EPS, train_eps=1e-3,
                t_min=1e-5, codec="topk", k=4)
    base.update(kw)
    return S.ExampleSpec(**base)


def _same(a: S.Example, b: S.Example) -> bool:
    return (a.index == b.index and a.t == b.t and np.array_equal(a.xt, b.xt) and a.fields.keys() == b.fields.keys()
            and all(np.array_equal(a.fields[k], b.fields[k]) for k in a.fields))


@pytest.mark.parametrize("codec", ["topk", "topk_is", "sampled", "dense"])
def test_examples_do_not_depend_on_the_batch(codec):
    teacher = _mixing_teacher()
    x0 = torch.randint(0, V, (6, 16), generator=torch.Generator().manual_seed(0))
    idx = [10, 11, 12, 40, 41, 99]
    spec = _spec(codec=codec)
    together = S.make_examples(teacher, x0, idx, spec)
    alone = [S.make_examples(teacher, x0[b:b + 1], [i], spec)[0] for b, i in enumerate(idx)]
    shuffled = S.make_examples(teacher, x0[[5, 2, 0]], [idx[5], idx[2], idx[0]], spec)
    assert all(_same(a, b) for a, b in zip(together, alone))
    assert _same(shuffled[0], together[5]) and _same(shuffled[1], together[2]) and _same(shuffled[2], together[0])
    one = S.make_example(x0[3], idx[3], 7, 2, teacher, **{k: v for k, v in vars(spec).items()
                                                         if k not in ("seed", "round_idx")})
    assert _same(one, together[3])
    for ex in together:
        masked = ex.xt == MASK
        assert ex.meta()["num_masked"] == masked.sum() and ex.meta()["index"] == ex.index
        assert np.array_equal(ex.xt[~masked], x0[idx.index(ex.index)].numpy()[~masked])


def test_examples_depend_on_seed_round_and_index():
    teacher = _mixing_teacher()
    x0 = torch.randint(0, V, (1, 64), generator=torch.Generator().manual_seed(0))
    a = S.make_examples(teacher, x0, [3], _spec())[0]
    for other in (S.make_examples(teacher, x0, [3], _spec(seed=8))[0],
                  S.make_examples(teacher, x0, [3], _spec(round_idx=3))[0],
                  S.make_examples(teacher, x0, [4], _spec())[0]):
        assert other.t != a.t and not np.array_equal(other.xt, a.xt)
    assert S.sample_seed(0, 1, 2) != S.sample_seed(0, 2, 1) and S.sample_seed(0, 1, 2) < 2**63


# --------------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------------
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
