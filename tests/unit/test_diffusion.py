"""Properties of the pure MDLM math (trainer/method/diffusion.py)."""
import math

import numpy as np
import pytest
import torch

from trainer.method import diffusion as D

EPS = 1e-3
MASK = 8  # vocabulary of 8 real tokens


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; p-value from the regularised upper incomplete gamma."""
    n = counts.sum()
    expected = probs.double() * n
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def test_elbo_weight_is_one_over_t():
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    assert torch.allclose(D.elbo_weight(t, EPS), 1 / t, rtol=1e-9)


def test_sample_times_antithetic_covers_strata():
    n = 64
    t = D.sample_times(n, gen(), train_eps=1e-3, antithetic=True).double()
    u = (t - 1e-3) / (1 - 1e-3)
    strata = torch.floor(u * n).long().sort().values
    assert torch.equal(strata, torch.arange(n))  # exactly one draw per stratum
    assert t.min() >= 1e-3 and t.max() <= 1.0


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_masking_rate_matches_schedule(t):
    n, L = 400, 256
    x0 = torch.randint(0, MASK, (n, L), generator=gen(1))
    xt = D.mask_tokens(x0, torch.full((n,), t), MASK, EPS, gen(2))
    p = (1 - EPS) * t
    rate = (xt == MASK).double().mean().item()
    se = math.sqrt(p * (1 - p) / (n * L))
    assert abs(rate - p) < 4 * se
    assert torch.equal(xt[xt != MASK], x0[xt != MASK])  # masking never alters a visible token


def test_subs_never_predicts_mask_and_carries_visible_tokens():
    logits = torch.randn(2, 5, MASK + 1, generator=gen())
    xt = torch.tensor([[1, MASK, 3, MASK, 0], [MASK, MASK, 2, 2, MASK]])
    lp = D.subs_log_probs(logits, xt, MASK)
    assert torch.all(lp[..., MASK] == float("-inf"))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 5))
    visible = xt != MASK
    assert torch.all(lp[visible].argmax(-1) == xt[visible])
    assert torch.all(lp[visible].max(-1).values == 0)


def test_elbo_nll_counts_only_masked_positions():
    x0 = torch.tensor([[1, 2, 3, 4]])
    xt = torch.tensor([[1, MASK, 3, MASK]])
    lp = D.subs_log_probs(torch.zeros(1, 4, MASK + 1), xt, MASK)  # uniform over 8 real tokens
    t = torch.tensor([0.5])
    nll = D.elbo_nll(lp, x0, xt, t, MASK, EPS)
    assert torch.allclose(nll, torch.tensor([2 * math.log(8) * 2 / 4]), rtol=1e-5)  # 2 masked * w=1/t


def test_ancestral_step_keeps_visible_tokens_and_unmasks_at_the_right_rate():
    b, L = 200, 500
    t, s = 0.8, 0.5
    xt = torch.randint(0, MASK, (b, L), generator=gen(3))
    masked = torch.rand(b, L, generator=gen(4)) < 0.6
    xt = torch.where(masked, torch.full_like(xt, MASK), xt)
    logits = torch.randn(b, L, MASK + 1, generator=gen(5))
    lp = D.masked_log_probs(logits[masked], MASK)  # the denoiser's rows: the masked positions
    xs = D.ancestral_step(lp, xt, torch.full((b,), t), torch.full((b,), s), MASK, EPS, gen(6))
    assert torch.equal(xs[~masked], xt[~masked])
    stay = (xs[masked] == MASK).double().mean().item()
    p = D.move_chance(torch.tensor(s), EPS) / D.move_chance(torch.tensor(t), EPS)
    se = math.sqrt(p * (1 - p) / masked.sum().item())
    assert abs(stay - p.item()) < 4 * se
    assert not torch.any(xs[~masked] == MASK)


def test_ancestral_step_draws_tokens_from_the_denoiser():
    b, L = 1, 60000
    xt = torch.full((b, L), MASK)
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.015, 0.005])
    lp = probs.log().expand(b * L, -1)
    xs = D.ancestral_step(lp, xt, torch.tensor([1.0]), torch.tensor([0.0]), MASK, EPS, gen(7))
    assert not torch.any(xs == MASK)  # s = 0: nothing can stay masked
    counts = torch.bincount(xs.flatten(), minlength=MASK)
    assert chi2_pvalue(counts, probs) > 1e-3


def ancestral_law(log_p: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """Reference law of one reverse step for a masked position with log p(x0) = log_p [V], as
    [V + 1] float64: token v with p(v) (a_t - a_s) / a_t, MASK (last) with a_s / a_t."""
    a_t, a_s = (D.move_chance(torch.tensor(x, dtype=torch.float64), EPS) for x in (t, s))
    return torch.cat([log_p.double().exp() * (a_t - a_s) / a_t, (a_s / a_t)[None]])


def test_ancestral_step_reproduces_a_very_skewed_categorical_in_float64():
    """MASK and tokens together: counts of 200k positions against the exact law, with token
    probabilities down to 1e-5 and three tokens of probability zero (flat steps of the CDF)."""
    n = 200_000
    probs = torch.tensor([1 - 1.111e-2, 1e-2, 1e-3, 1e-4, 1e-5, 0, 0, 0], dtype=torch.float64)
    probs = probs / probs.sum()
    log_p = probs.log().float()
    t, s = 0.9, 0.3
    xs = D.ancestral_step(log_p.expand(n, -1), torch.full((1, n), MASK), torch.tensor([t]), torch.tensor([s]),
                          MASK, EPS, gen(9))
    counts = torch.bincount(xs.flatten(), minlength=MASK + 1).double()
    law = ancestral_law(log_p, t, s)
    assert counts[5:MASK].sum() == 0  # zero-probability tokens are never drawn
    # Pool the two rarest tokens so every expected count is large enough for chi-square.
    keep = [0, 1, 2, MASK]
    pooled_c = torch.cat([counts[keep], counts[3:5].sum(0, keepdim=True)])
    pooled_p = torch.cat([law[keep], law[3:5].sum(0, keepdim=True)])
    assert chi2_pvalue(pooled_c, pooled_p) > 1e-3


def test_ancestral_step_noise_is_two_uniforms_per_position():
    """The step's randomness is ancestral_uniforms: the same uniforms give the same step, and the
    generator advances by 2 L float64 draws per sample, whether or not anything unmasks."""
    b, L = 3, 40
    lp = D.masked_log_probs(torch.randn(b * L, MASK + 1, generator=gen(1)), MASK)
    xt = torch.full((b, L), MASK)
    t, s = torch.full((b,), 0.7), torch.full((b,), 0.4)
    g = gen(2)
    x1 = D.ancestral_step(lp, xt, t, s, MASK, EPS, g)
    after = torch.rand(1, generator=g, dtype=torch.float64)
    x2 = D.ancestral_update(lp, xt, t, s, MASK, EPS, D.ancestral_uniforms(b, L, gen(2)))
    assert torch.equal(x1, x2)
    ref = gen(2)
    torch.rand((b, 2, L), generator=ref, dtype=torch.float64)
    assert torch.equal(after, torch.rand(1, generator=ref, dtype=torch.float64))
    assert torch.equal(D.ancestral_step(lp, xt, t, t, MASK, EPS, gen(3)), xt)  # s = t: nothing unmasks


def test_float64_gumbel_reproduces_a_very_skewed_categorical():
    # Probabilities spanning six orders of magnitude; 200k draws.
    probs = torch.tensor([1 - 1.111e-2, 1e-2, 1e-3, 1e-4, 1e-5], dtype=torch.float64)
    probs = probs / probs.sum()
    n = 200_000
    draws = D.gumbel_argmax(probs.log().expand(n, -1), gen(8))
    counts = torch.bincount(draws, minlength=len(probs))
    # Pool the two rarest classes so every expected count is large enough for chi-square.
    pooled_c = torch.cat([counts[:3], counts[3:].sum(0, keepdim=True)])
    pooled_p = torch.cat([probs[:3], probs[3:].sum(0, keepdim=True)])
    assert chi2_pvalue(pooled_c, pooled_p) > 1e-3


def _float32_gumbel_tail_probability(log_ratio: float) -> float:
    """Exact probability that float32 Gumbel-max picks a class whose log-weight is ``log_ratio``
    below its only competitor, by enumerating all 2**24 values torch.rand(float32) can return."""
    # u = 0 is excluded, as a careful float32 sampler does (else log(0) gives the dominant class
    # -inf noise once in 2**24 draws: a different error, in the other direction).
    u = torch.arange(1, 2**24, dtype=torch.float64) * 2.0**-24
    g = -torch.log(-torch.log(u.float())).double()  # the float32 sampler's whole noise lattice
    g_sorted = g.sort().values
    # P(g_tail + log_ratio > g_dom) = mean over g_tail of the fraction of lattice g_dom below it.
    below = torch.searchsorted(g_sorted, g + log_ratio)
    return float(below.double().mean() / len(g))


def test_float32_gumbel_truncates_the_tail_where_float64_does_not():
    # float32 noise lives on a lattice bounded by ~16.6 (u = 1 - 2**-24), so a class 20 nats below
    # its competitor is never drawn (exact enumeration), and one 17 nats below is drawn visibly too
    # rarely. In float64 these probabilities are exp(-20) and exp(-17) (the noise is unbounded to
    # within 2**-53), which the sampler's noise covers: its range must exceed 20 nats.
    assert _float32_gumbel_tail_probability(-20.0) == 0.0
    p17 = _float32_gumbel_tail_probability(-17.0)
    assert p17 < 0.75 * math.exp(-17.0) / (1 + math.exp(-17.0))
    # Sanity of the enumeration itself: a moderate ratio is reproduced by float32 too.
    p5 = _float32_gumbel_tail_probability(-5.0)
    assert abs(p5 - math.exp(-5) / (1 + math.exp(-5))) < 1e-4
    u_max = torch.tensor(1.0 - 2**-53, dtype=torch.float64)
    assert -torch.log(-torch.log(u_max)) > 36.0


def test_final_step_fills_masks_with_argmax():
    xt = torch.tensor([[MASK, 2, MASK]])
    logits = torch.zeros(1, 3, MASK + 1)
    logits[0, 0, 5] = 3.0
    logits[0, 2, 1] = 3.0
    lp = D.masked_log_probs(logits[xt == MASK], MASK)
    assert D.final_step(lp, xt, MASK).tolist() == [[5, 2, 1]]


def test_time_grid():
    grid = D.time_grid(4, 1e-5)
    assert grid.dtype == torch.float64 and len(grid) == 5
    assert grid[0] == 1.0 and abs(grid[-1].item() - 1e-5) < 1e-15
    assert np.allclose(np.diff(grid.numpy()), -(1 - 1e-5) / 4)


def test_masked_position_forms_equal_the_full_tensor_forms():
    """masked_log_probs / elbo_nll_at (the head's rows at masked positions only, what the jobs and
    denoisers use) give subs_log_probs / elbo_nll's values, and the same gradients."""
    b, L = 4, 12
    x0 = torch.randint(0, MASK, (b, L), generator=gen(20))
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    xt = D.mask_tokens(x0, t, MASK, EPS, gen(21))
    xt[0] = x0[0]  # a sample with nothing masked
    masked = xt == MASK
    logits = torch.randn(b, L, MASK + 1, generator=gen(22), dtype=torch.float32, requires_grad=True)
    full = D.subs_log_probs(logits, xt, MASK)
    torch.testing.assert_close(D.masked_log_probs(logits[masked], MASK), full[masked][:, :MASK])
    ref = D.elbo_nll(full, x0, xt, t, MASK, EPS)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    got = D.elbo_nll_at(D.masked_log_probs(logits[masked], MASK), x0, xt, t, MASK, EPS)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    assert got[0] == 0 and torch.all(got[1:] > 0)
