"""The training-free samplers (sampling.top_p / min_p / order / grid): their pure rules on small
examples computed here independently, their defaults equal to the plain sampler bit for bit, the
pairing they keep or break, their config keys and the report's comparison with them."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.evaluation import compare
from trainer.method import diffusion as D
from trainer.method import sampling

V, L, MASK, EPS = 6, 12, 6, 1e-3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def toy_denoiser(seed: int = 0, sharp: float = 3.0):
    """A fixed, input-dependent denoiser: log p(x0 | xt) at the masked positions depends on the position
    and on how many tokens of the row are visible (so caching and the unmasking order matter)."""
    table = torch.randn(L, V, generator=gen(seed), dtype=torch.float64) * sharp

    def denoise(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        visible = (xt != MASK).sum(1, keepdim=True).double()  # [B, 1]
        logits = table[None] * (1 + 0.1 * visible[:, :, None])  # [B, L, V]
        return torch.log_softmax(logits[xt == MASK], dim=-1).float()

    return denoise


def draw(denoise, steps: int = 6, batch: int = 16, seed: int = 3, **kw) -> torch.Tensor:
    return sampling.sample_diffusion(denoise, batch, L, steps, MASK, noise_eps=EPS, sampling_eps=1e-5,
                                     generator=gen(seed), **kw)


# ---- defaults: the plain sampler, bit for bit ----------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_one_and_min_p_zero_are_the_plain_sampler_bit_for_bit(temperature):
    den = toy_denoiser()
    plain = draw(den, temperature=temperature)
    same = draw(den, temperature=temperature, top_p=1.0, min_p=0.0, order="random", grid="linear")
    assert torch.equal(plain, same)
    lp = torch.log_softmax(torch.randn(20, V, generator=gen(1)), -1)
    assert torch.equal(D.tempered_cdf(lp, temperature, 1.0, 0.0), D.tempered_cdf(lp, temperature))
    # ...while a real cut changes the samples (the test could fail).
    assert not torch.equal(plain, draw(den, temperature=temperature, top_p=0.5))


# ---- top-p and min-p -----------------------------------------------------------------------------
def _smallest_set_mass_at_least(p: np.ndarray, q: float) -> set[int]:
    """Brute force: among all subsets with mass >= q, the smallest; among those, the most massive."""
    best = None
    for r in range(1, p.size + 1):
        for sub in itertools.combinations(range(p.size), r):
            m = p[list(sub)].sum()
            if m >= q and (best is None or m > p[list(best)].sum()):
                best = sub
        if best is not None:
            return set(best)
    raise AssertionError("unreachable")


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.dirichlet(np.full(V, 0.5))
        q = float(rng.uniform(0.05, 0.99))
        kept = D.truncation_mask(torch.from_numpy(p)[None], top_p=q)[0].numpy()
        assert set(np.flatnonzero(kept)) == _smallest_set_mass_at_least(p, q)


def test_top_p_differs_from_duo_and_sdtt_only_when_a_prefix_mass_equals_p():
    """Duo/SDTT (utils.top_k_top_p_filtering): sort descending, remove where the cumulative mass
    (inclusive) exceeds p, shifted right by one so the token that crosses p stays. Written here from
    that description, on numpy."""

    def duo_keep(p: np.ndarray, q: float) -> np.ndarray:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        remove = cum > q
        remove[1:] = remove[:-1].copy()
        remove[0] = False
        keep = np.zeros(p.size, bool)
        keep[order] = ~remove
        return keep

    rng = np.random.default_rng(1)
    for _ in range(100):
        p = rng.dirichlet(np.ones(V))
        q = float(rng.uniform(0.1, 0.95))
        assert np.array_equal(D.truncation_mask(torch.from_numpy(p)[None], top_p=q)[0].numpy(), duo_keep(p, q))
    tie = np.array([0.5, 0.25, 0.125, 0.125, 0.0, 0.0])  # 0.5 + 0.25 == 0.75 exactly
    ours = D.truncation_mask(torch.from_numpy(tie)[None], top_p=0.75)[0].numpy()
    assert ours.tolist() == [True, True, False, False, False, False]
    assert duo_keep(tie, 0.75).tolist() == [True, True, True, False, False, False]


def test_min_p_keeps_tokens_at_least_min_p_times_the_likeliest_then_top_p_acts_on_the_rest():
    p = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.04, 0.01]], dtype=torch.float64)
    assert D.truncation_mask(p, min_p=0.25)[0].tolist() == [True, True, True, True, False, False]  # >= 0.1
    # Renormalised over the 4 kept (mass 0.95): 0.421, 0.316 -> 0.737 < 0.8, + 0.158 -> 0.895.
    assert D.truncation_mask(p, top_p=0.8, min_p=0.25)[0].tolist() == [True, True, True, False, False, False]
    assert D.truncation_mask(p * 7.0, min_p=0.25).tolist() == D.truncation_mask(p, min_p=0.25).tolist()


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.0), dict(min_p=-0.1)])
def test_truncation_rejects_settings_outside_its_range(bad):
    with pytest.raises(ValueError):
        D.truncation_mask(torch.ones(1, V, dtype=torch.float64), **bad)


def test_truncated_draws_follow_the_renormalised_kept_law_in_float64():
    """Frequencies of 200k one-step draws from a top-p / min-p cut of a tempered law."""
    n = 200_000
    log_p = torch.log(torch.tensor([0.45, 0.25, 0.15, 0.1, 0.04, 0.01], dtype=torch.float64))
    for kw, temperature in ((dict(top_p=0.8), 1.0), (dict(min_p=0.2), 0.8)):
        w = torch.softmax(log_p / temperature, -1)
        keep = D.truncation_mask(w[None], **kw)[0]
        want = torch.where(keep, w, torch.zeros_like(w))
        want = want / want.sum()
        xs = D.ancestral_step(log_p.float().expand(n, -1), torch.full((1, n), MASK), torch.tensor([1.0]),
                              torch.tensor([0.0]), MASK, EPS, gen(5), temperature, **kw)
        freq = torch.bincount(xs[0], minlength=V).double() / n
        assert (freq[~keep] == 0).all()
        se = torch.sqrt(want * (1 - want) / n)
        assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)


# ---- the cosine time grid ------------------------------------------------------------------------
def test_cosine_grid_is_maskgit_cosine_schedule_from_1_to_eps():
    steps, eps = 8, 1e-5
    g = D.time_grid(steps, eps, "cosine")
    want = [eps + (1 - eps) * math.cos(math.pi / 2 * i / steps) for i in range(steps + 1)]
    assert g.dtype == torch.float64 and g[0] == 1.0 and g[-1] == eps
    assert torch.allclose(g, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)
    assert (g[1:] < g[:-1]).all()
    lin = D.time_grid(steps, eps)
    # Few tokens unmask first (the expected fraction a_s / a_t kept is larger), more at the end.
    assert g[1] / g[0] > lin[1] / lin[0] and g[-2] > lin[-2]
    with pytest.raises(ValueError):
        D.time_grid(steps, eps, "quadratic")


def test_cosine_grid_masks_what_duos_cosine_noise_schedule_masks_on_a_linear_grid():
    """Duo (trainer_base.Cosine): alpha_t = 1 - cos(pi/2 (1 - (1 - eps) t)), the masked fraction is
    1 - alpha_t, and its sampler walks a linear grid t_i = 1 - i/N (written here from that code's
    description). Our cosine grid under MDLM's log-linear schedule masks the same fractions, up to the
    two eps."""
    steps, eps = 8, 1e-3
    duo = [math.cos(math.pi / 2 * (1 - (1 - eps) * (1 - i / steps))) for i in range(steps + 1)]
    ours = D.move_chance(D.time_grid(steps, 1e-5, "cosine"), eps).tolist()
    assert max(abs(a - b) for a, b in zip(duo, ours)) < 3e-3


def test_cosine_grid_unmasks_the_schedules_expected_share_per_step():
    """Random order: the share of still-masked positions that unmask from t to s is 1 - a_s / a_t."""
    steps, n = 4, 40_000
    g = D.time_grid(steps, 1e-5, "cosine")
    x = torch.full((n, 1), MASK)
    lp = torch.log_softmax(torch.zeros(1, V), -1)
    for i in range(steps - 1):
        a_t, a_s = D.move_chance(g[i], EPS), D.move_chance(g[i + 1], EPS)
        before = int((x == MASK).sum())
        x = D.ancestral_step(lp.expand(before, -1), x, g[i].expand(n), g[i + 1].expand(n), MASK, EPS, gen(10 + i))
        share = 1 - int((x == MASK).sum()) / before
        want = float(1 - a_s / a_t)
        assert abs(share - want) <= 5 * math.sqrt(want * (1 - want) / before) + 1e-9


# ---- confidence-ordered unmasking ----------------------------------------------------------------
def test_unmask_count_follows_the_schedules_expected_count_and_ends_with_none_masked():
    for kind in ("linear", "cosine"):
        g = D.time_grid(8, 1e-5, kind)
        masked = torch.tensor([L, 5])
        for i in range(8):
            a_t, a_s = D.move_chance(g[i].expand(2), EPS), D.move_chance(g[i + 1].expand(2), EPS)
            k = D.unmask_count(masked, a_t, a_s)
            left = (masked.double() * a_s / a_t).tolist()
            assert [m - kk for m, kk in zip(masked.tolist(), k.tolist())] == [math.floor(v + 0.5) for v in left]
            masked = masked - k
        assert masked.tolist() == [0, 0]


def test_confidence_sampler_unmasks_the_counted_most_confident_positions():
    """Per step, the number of masked positions falls exactly as ``unmask_count`` says, and the
    positions unmasked are those whose drawn token had the highest probability."""
    steps, batch = 5, 4
    den = toy_denoiser(seed=2, sharp=2.0)
    inputs = []

    def recording(xt, t):
        inputs.append(xt.clone())
        return den(xt, t)

    out = draw(recording, steps=steps, batch=batch, order="confidence", cache=False)
    assert not (out == MASK).any()
    g = D.time_grid(steps, 1e-5)
    counts = [torch.full((batch,), L)]
    for i in range(steps):
        a_t, a_s = D.move_chance(g[i].expand(batch), EPS), D.move_chance(g[i + 1].expand(batch), EPS)
        counts.append(counts[-1] - D.unmask_count(counts[-1], a_t, a_s))
    seen = [(x == MASK).sum(1) for x in inputs] + [(out == MASK).sum(1)]
    assert [c.tolist() for c in seen] == [c.tolist() for c in counts]
    # The first step: recompute every masked position's draw by hand and check the chosen ones.
    u = D.ancestral_uniforms(batch, L, gen(3))
    lp = den(torch.full((batch, L), MASK), torch.ones(batch)).double()
    cdf = torch.cumsum(lp.exp(), -1)
    tok = torch.searchsorted(cdf, (u[:, 1].reshape(-1, 1) * cdf[:, -1:]), right=True).clamp(max=V - 1)
    prob = lp.exp().gather(1, tok).reshape(batch, L)
    first = inputs[1] != MASK
    for b in range(batch):
        k = int(first[b].sum())
        top = set(torch.argsort(prob[b], descending=True)[:k].tolist())
        assert set(first[b].nonzero().flatten().tolist()) == top
        assert torch.equal(inputs[1][b][first[b]], tok.reshape(batch, L)[b][first[b]])


def test_random_order_keeps_the_unmasking_schedule_of_every_model_confidence_order_does_not():
    """The report's pairing: with random order the positions unmasked at each step depend on the
    noise alone (two models, two truncations: the same masks); with confidence order on the model."""

    def masks(den, **kw):
        seen = []

        def rec(xt, t):
            seen.append(xt == MASK)
            return den(xt, t)

        draw(rec, steps=6, cache=False, **kw)
        return torch.stack(seen)

    a, b = toy_denoiser(seed=4), toy_denoiser(seed=5)
    assert torch.equal(masks(a), masks(b, top_p=0.7))
    assert torch.equal(masks(a, grid="cosine"), masks(b, grid="cosine", min_p=0.3))
    assert not torch.equal(masks(a, order="confidence"), masks(b, order="confidence"))


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="order"):
        draw(toy_denoiser(), order="leftmost")


# ---- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("sampling.top_p=0", "sampling.top_p"), ("sampling.min_p=1.0", "sampling.min_p"),
    ("sampling.order=greedy", "sampling.order"), ("sampling.grid=log", "sampling.grid"),
    ("eval.samplers=[{name: a, top_p: 2}]", "eval.samplers[0].top_p"),
    ("eval.samplers=[{name: a}, {name: a, min_p: 0.1}]", "eval.samplers[1].name"),
    ("eval.samplers=[{top_p: 0.9}]", "eval.samplers[0].name"),
    ("eval.samplers=[{name: plain}]", "eval.samplers[0].name"),
])
def test_sampler_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config("configs/tiny-regime.yaml", [override])


def test_sampler_config_loads_named_samplers():
    cfg = load_config("configs/tiny-regime.yaml", ["eval.samplers=[{name: p9, top_p: 0.9}, {name: conf, "
                                                   "order: confidence, grid: cosine}]", "sampling.min_p=0.05"])
    assert [s.name for s in cfg.eval.samplers] == ["p9", "conf"]
    assert sampling.sampler_options(cfg.eval.samplers[1]) == dict(top_p=1.0, min_p=0.0, order="confidence",
                                                                  grid="cosine")
    assert sampling.sampler_options(cfg.sampling)["min_p"] == 0.05


# ---- the report's comparison ------------------------------------------------------------------------
def _row(model, rnd, steps, temperature, nll, ent, sampler="plain"):
    return {"model": model, "round": rnd, "steps": steps, "temperature": temperature, "sampler": sampler,
            "nll_per_sample": list(nll), "entropy_per_sample": list(ent), "entropy": float(np.mean(ent))}


def test_compare_samplers_picks_the_best_and_pairs_the_student_with_it():
    rng = np.random.default_rng(0)
    n, steps = 64, 8
    noise = rng.normal(0, 0.3, n)  # shared per sample: pairing removes it
    rows = []
    # Each model/sampler: NLL level at T = 1 and at T = 0.8, entropies 2.3 and 2.1 (target 2.2 between).
    for model, rnd, sampler, (hi, lo) in (("teacher", 0, "plain", (1.50, 1.40)), ("teacher", 0, "p9", (1.45, 1.30)),
                                          ("teacher", 0, "conf", (1.35, 1.42)), ("student", 1, "plain", (1.40, 1.20))):
        for tau, lvl, h in ((1.0, hi, 2.3), (0.8, lo, 2.1)):
            rows.append(_row(model, rnd, steps, tau, lvl + noise, np.full(n, h) + rng.normal(0, 1e-3, n), sampler))
    out = compare.compare_samplers(rows, 1, steps, 2.2)
    assert out["best"] == "conf"  # lowest at T = 1
    assert out["best_at_H"] == "p9"  # lowest at the data's entropy: (1.45 + 1.30) / 2 < conf's 1.385
    assert out["student_minus_best"]["value"] == pytest.approx(1.40 - 1.35, abs=1e-9)
    assert out["student_minus_best"]["se"] < 1e-9  # the shared noise cancels sample by sample
    assert out["student_minus_best_at_H"]["value"] == pytest.approx(1.30 - 1.375, abs=2e-3)
    assert out["best_minus_plain_at_H"]["value"] == pytest.approx(1.375 - 1.45, abs=2e-3)
    # The plain comparisons do not see the sampler rows.
    c = compare.compare_round(rows, 1, steps, 2.2)
    assert c["teacher_nll"]["value"] == pytest.approx(1.50 + noise.mean())
    assert compare.compare_samplers([r for r in rows if r["sampler"] == "plain"], 1, steps, 2.2) is None


def test_tools_samplers_tabulates_the_teachers_samplers_without_a_student():
    from tools.samplers import sampler_table

    rng = np.random.default_rng(1)
    n = 32
    rows = [_row("teacher", 0, 8, tau, np.full(n, lvl) + rng.normal(0, 0.1, n), np.full(n, h), name)
            for name, (hi, lo) in (("plain", (1.5, 1.4)), ("min_p-0.1", (1.3, 1.35)))
            for tau, lvl, h in ((1.0, hi, 2.3), (0.8, lo, 2.1))]
    text = sampler_table(rows, 8, 2.2)
    assert "| min_p-0.1 |" in text and "best at the data's entropy: `min_p-0.1`" in text
    with pytest.raises(Exception, match="no eval.samplers rows at 4 steps"):
        sampler_table(rows, 4, 2.2)


def test_the_evaluation_draws_each_named_sampler_at_its_temperatures_paired_with_plain():
    """trainer/evaluation/sweep.py with a real (untrained) DiT: the plan, and a named sampler with the
    defaults (top_p = 1, min_p = 0) gives the plain rows' samples bit for bit."""
    from trainer.data.synthetic import MarkovSource
    from trainer.evaluation.sweep import evaluate_model
    from trainer.model.dit import DiT

    cfg = load_config("configs/tiny-regime.yaml", [
        "eval.num_samples=6", "eval.batch_size=4", "eval.samplers=[{name: same}, {name: p9, top_p: 0.9, "
        "temperatures: [1.0, 1.2]}]"])
    torch.manual_seed(0)
    model = DiT(cfg.model)
    rows = evaluate_model(model, cfg, [8], MarkovSource(cfg.data.synthetic), None, torch.device("cpu"),
                          keep_samples=True, sweep={4: [0.9, 1.0]}, samplers=cfg.eval.samplers)
    plan = sorted((r["steps"], r["temperature"], r["sampler"]) for r in rows)
    assert plan == sorted([(8, 1.0, "plain"), (4, 0.9, "plain"), (4, 1.0, "plain"), (4, 0.9, "same"),
                           (4, 1.0, "same"), (4, 1.0, "p9"), (4, 1.2, "p9")])
    by = {(r["steps"], r["temperature"], r["sampler"]): r for r in rows}
    assert torch.equal(by[(4, 0.9, "plain")]["_samples"], by[(4, 0.9, "same")]["_samples"])
    assert by[(4, 1.0, "p9")]["invalid_rate"] is not None


def test_a_samplers_own_temperatures_are_checked():
    with pytest.raises(ConfigError, match=r"eval.samplers\[0\].temperatures"):
        load_config("configs/tiny-regime.yaml", ["eval.samplers=[{name: a, temperatures: [1.0, 0]}]"])
