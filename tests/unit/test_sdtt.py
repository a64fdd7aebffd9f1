"""trainer/method/sdtt.py: the teacher's time grid and target assignment, and deterministic examples
(the divergences: test_divergences.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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
