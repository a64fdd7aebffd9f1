"""Paired statistics, the report's comparisons, the sampling temperature and the fair control's plan."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.distill import control
from trainer.evaluation import compare, paired
from trainer.method import diffusion


def test_paired_se_is_tighter_than_the_unpaired_one_when_samples_share_noise():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1, 4000)
    a, b = 2.0 + shared + 0.1 * rng.normal(size=4000), 1.9 + shared + 0.1 * rng.normal(size=4000)
    d = paired.mean(a) - paired.mean(b)
    assert d.value == pytest.approx(float(np.mean(a - b)))
    assert d.se == pytest.approx(float(np.std(a - b, ddof=1) / math.sqrt(4000)))
    unpaired = math.hypot(paired.mean(a).se, paired.mean(b).se)
    assert d.se < unpaired / 5
    with pytest.raises(ValueError, match="same samples"):
        _ = paired.mean(a) - paired.mean(b[:10])


def _bootstrap_se(fn, arrays, reps=2000, seed=1):
    rng = np.random.default_rng(seed)
    n = arrays[0].size
    vals = []
    for _ in range(reps):
        i = rng.integers(0, n, n)
        vals.append(fn(*(x[i].mean() for x in arrays)))
    return float(np.std(vals, ddof=1))


def test_gap_closed_value_and_delta_method_se_match_a_bootstrap():
    rng = np.random.default_rng(2)
    n = 3000
    z = rng.normal(size=n)
    t_few = 2.8 + z + 0.3 * rng.normal(size=n)
    s_few = 2.6 + z + 0.3 * rng.normal(size=n)
    t_many = 1.9 + 0.5 * z + 0.3 * rng.normal(size=n)
    g = paired.gap_closed(paired.mean(t_few), paired.mean(s_few), paired.mean(t_many))
    ref = (t_few.mean() - s_few.mean()) / (t_few.mean() - t_many.mean())
    assert g.value == pytest.approx(ref)
    boot = _bootstrap_se(lambda a, b, c: (a - b) / (a - c), [t_few, s_few, t_many])
    assert g.se == pytest.approx(boot, rel=0.1)


def _sweep_rows(n=2000, seed=3, slope=-0.5, h0=3.3, nll0=2.5, noise=0.2):
    """Synthetic sweep: entropy grows with temperature, NLL falls along a line NLL = nll0 + slope (H - h0)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    rows = []
    for tau, dh in ((0.8, -0.2), (0.9, -0.1), (1.0, 0.0), (1.1, 0.1)):
        ent = h0 + dh + 0.05 * z + 0.02 * rng.normal(size=n)
        nll = nll0 + slope * dh + noise * z + 0.05 * rng.normal(size=n)
        rows.append({"temperature": tau, "entropy_per_sample": ent.tolist(), "nll_per_sample": nll.tolist()})
    return rows


def test_nll_at_entropy_interpolates_and_flags_extrapolation():
    rows = _sweep_rows()
    f = paired.frontier(rows)
    assert [round(t, 1) for t in f.temperatures] == [0.8, 0.9, 1.0, 1.1]
    at = paired.nll_at_entropy(f, 3.25)
    assert not at.extrapolated
    assert at.est.value == pytest.approx(2.5 - 0.5 * -0.05, abs=0.01)
    assert 0 < at.est.se < 0.02
    far = paired.nll_at_entropy(f, 3.6)
    assert far.extrapolated and far.est.value == pytest.approx(2.5 - 0.5 * 0.3, abs=0.02)
    assert paired.nll_at_entropy(paired.frontier(rows[:1]), 3.3) is None


def test_nll_at_entropy_se_matches_a_bootstrap():
    rows = _sweep_rows(n=1500, seed=5)
    f = paired.frontier(rows)
    at = paired.nll_at_entropy(f, 3.23)
    arrs = [np.asarray(r[k]) for r in sorted(rows, key=lambda r: np.mean(r["entropy_per_sample"]))
            for k in ("entropy_per_sample", "nll_per_sample")]
    h1, n1, h2, n2 = arrs[2], arrs[3], arrs[4], arrs[5]  # points 1 and 2 bracket 3.23 (3.2 and 3.3)
    assert f.entropy[1].value < 3.23 < f.entropy[2].value

    def fn(ha, na, hb, nb):
        w = (3.23 - ha) / (hb - ha)
        return na + w * (nb - na)

    boot = _bootstrap_se(fn, [h1, n1, h2, n2])
    assert at.est.value == pytest.approx(fn(h1.mean(), n1.mean(), h2.mean(), n2.mean()))
    assert at.est.se == pytest.approx(boot, rel=0.12)


def test_t_interval():
    r = paired.t_interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["lo"] == pytest.approx(2 - 4.303 / math.sqrt(3))
    assert paired.t_interval([1.0])["lo"] is None and paired.t_interval([])["n"] == 0


def _row(model, rnd, steps, nll, ent, tau=1.0):
    return {"model": model, "round": rnd, "steps": steps, "temperature": tau, "nll_per_sample": list(nll),
            "entropy_per_sample": list(ent), "entropy": float(np.mean(ent)), "bigram_kl": 0.1}


def test_compare_round_pairs_the_models_and_reads_matched_entropy():
    rng = np.random.default_rng(7)
    n = 500
    z = rng.normal(size=n)
    z -= z.mean()
    e = lambda m: m + 0.01 * rng.normal(size=n)  # noqa: E731
    rows = [_row("teacher", 0, 64, 1.9 + 0.5 * z, e(3.4)), _row("teacher", 0, 16, 2.8 + z, e(3.45)),
            _row("teacher", 0, 8, 3.0 + z, e(3.5)),
            _row("student", 1, 8, 2.5 + z, e(3.3)), _row("student", 1, 8, 2.3 + z, e(3.2), tau=0.9),
            _row("teacher", 0, 8, 2.9 + z, e(3.4), tau=0.9), _row("teacher", 0, 8, 2.8 + z, e(3.3), tau=0.8),
            _row("control", 1, 8, 2.9 + z, e(3.5))]
    c = compare.compare_round(rows, 1, 8, target_entropy=3.3, control_round=1)
    assert c["student_minus_teacher"]["value"] == pytest.approx(-0.5, abs=1e-5)
    assert c["student_minus_teacher"]["se"] < 1e-9  # identical noise z: the paired SE vanishes
    assert c["student_minus_control"]["value"] == pytest.approx(-0.4, abs=1e-5)
    assert c["student_minus_teacher_2n"]["value"] == pytest.approx(2.5 - 2.8, abs=1e-5)
    assert c["gap_closed_student"]["value"] == pytest.approx(0.5 / 1.1, abs=1e-5)
    assert c["gap_closed_control"]["value"] == pytest.approx(0.1 / 1.1, abs=1e-5)
    # at matched entropy the student's lead shrinks to what it has beyond sharpening: 2.5 vs 2.8
    assert c["teacher_nll_at_H"]["value"] == pytest.approx(2.8, abs=0.02)
    assert c["student_nll_at_H"]["value"] == pytest.approx(2.5, abs=0.02)
    assert c["control_nll_at_H"] is None  # no sweep for it
    s = compare.summary([c])
    assert s["r1/student_minus_teacher"] == pytest.approx(-0.5, abs=1e-5)


def test_tempered_cdf_is_float64_and_matches_softmax():
    lp = torch.log_softmax(torch.randn(5, 11, dtype=torch.float32), -1)
    for tau in (0.5, 1.0, 2.0):
        cdf = diffusion.tempered_cdf(lp, tau)
        assert cdf.dtype == torch.float64
        p = torch.softmax(lp.double() / tau, -1)
        assert torch.allclose(cdf / cdf[:, -1:], torch.cumsum(p, -1), atol=1e-12)
    cold = diffusion.tempered_cdf(torch.tensor([[-1.0, -800.0, -2.0]]), 0.01)  # no overflow or NaN
    assert torch.isfinite(cold).all() and cold[0, -1] > 0
    with pytest.raises(ValueError, match="temperature"):
        diffusion.tempered_cdf(lp, 0.0)


def test_temperature_keeps_the_unmask_schedule_and_sharpens():
    g = torch.Generator().manual_seed(0)
    B, L, V = 64, 32, 9
    xt = torch.full((B, L), V)
    lp = torch.log_softmax(torch.randn(B * L, V, generator=g), -1)
    u = diffusion.ancestral_uniforms(B, L, g)
    t, s = torch.full((B,), 0.9), torch.full((B,), 0.5)
    outs = {tau: diffusion.ancestral_update(lp, xt, t, s, V, 1e-3, u, temperature=tau) for tau in (0.3, 1.0, 3.0)}
    masks = {tau: (o == V) for tau, o in outs.items()}
    assert torch.equal(masks[0.3], masks[1.0]) and torch.equal(masks[1.0], masks[3.0])
    top = lp.argmax(-1).view(B, L)
    hit = {tau: float((o == top)[~masks[tau]].float().mean()) for tau, o in outs.items()}
    assert hit[0.3] > hit[1.0] > hit[3.0]


def test_the_control_continues_the_teachers_stream_with_its_own_noise():
    cfg = load_config(None, ["train.steps=100", "engine.global_batch_size=32", "distill.global_batch_size=16",
                             "distill.rounds=2", "distill.steps_per_round=10", "train.seed=3"])
    assert control.control_stream(cfg, False) == (0, 3)
    offset, seed = control.control_stream(cfg, True)
    assert offset == 200  # 100 steps x 32 examples = 200 steps at 16: the next unseen example
    assert control.stage(cfg, True)[2] == 20 and seed != 3
    assert seed == control.control_noise_seed(3) != control.control_noise_seed(4)


def test_gap_closed_is_left_out_when_the_teachers_gap_is_noise():
    """(T_N - X_N) / (T_N - T_most) with a denominator within 2 SE of 0 would turn sampling noise into
    shares of hundreds of percent: the comparison gives None instead (the report shows '-')."""
    rng = np.random.default_rng(3)
    n = 200
    ent = 3.4 + 0.01 * rng.normal(size=n)
    rows = [_row("teacher", 0, 64, 2.0 + rng.normal(size=n), ent),
            _row("teacher", 0, 8, 2.01 + rng.normal(size=n), ent),
            _row("student", 1, 8, 1.9 + rng.normal(size=n), ent)]
    c = compare.compare_round(rows, 1, 8, target_entropy=None, control_round=None)
    assert c["student_minus_teacher"] is not None and c["gap_closed_student"] is None
    rows[1] = _row("teacher", 0, 8, 3.0 + rng.normal(size=n), ent)  # a real gap of 1 nat
    assert compare.compare_round(rows, 1, 8, target_entropy=None, control_round=None)["gap_closed_student"] is not None
