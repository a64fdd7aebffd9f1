"""Paired statistics for comparing samplers: every derived measure with a standard error.

The evaluation draws every model, step count and temperature with the same seed, and the unmasking
schedule depends on the noise alone (trainer/method/diffusion.py), so sample i of every row shares
its noise: rows pair up sample by sample. A measure is therefore carried as an ``Est``: its value
and its *influence* per sample (psi_i, with value ~ truth + mean(psi)). Means, differences, ratios
and interpolations combine the influences linearly (the delta method), and the standard error of
any result, including a difference between two models, is std(psi) / sqrt(n) over the n pairs:
the paired SE, which removes the noise the two rows share.

Everything here is a pure function of float64 numpy arrays.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Est:
    """A value with its per-sample influence ``psi`` [n] (the delta method's linearisation)."""

    value: float
    psi: np.ndarray

    @property
    def n(self) -> int:
        return int(self.psi.size)

    @property
    def se(self) -> float:
        """Standard error: std(psi) / sqrt(n) (nan below 2 samples)."""
        if self.psi.size < 2:
            return math.nan
        return float(self.psi.std(ddof=1) / math.sqrt(self.psi.size))

    def __sub__(self, other: Est) -> Est:
        _same_n(self, other)
        return Est(self.value - other.value, self.psi - other.psi)

    def __add__(self, other: Est) -> Est:
        _same_n(self, other)
        return Est(self.value + other.value, self.psi + other.psi)

    def scale(self, c: float) -> Est:
        return Est(c * self.value, c * self.psi)

    def as_dict(self, digits: int = 6) -> dict[str, float | None]:
        def r(v: float) -> float | None:
            return round(v, digits) if np.isfinite(v) else None

        return {"value": r(self.value), "se": r(self.se)}


def _same_n(a: Est, b: Est) -> None:
    if a.psi.shape != b.psi.shape:
        raise ValueError(f"paired estimates need the same samples: {a.psi.size} vs {b.psi.size}")


def mean(values: Sequence[float] | np.ndarray) -> Est:
    """The mean of per-sample values, with their centred values as influence."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean: expected a non-empty vector, got shape {x.shape}")
    m = float(x.mean())
    return Est(m, x - m)


def ratio(num: Est, den: Est) -> Est:
    """num / den by the delta method (nan when den is 0)."""
    _same_n(num, den)
    if den.value == 0:
        return Est(math.nan, np.full_like(num.psi, math.nan))
    r = num.value / den.value
    return Est(r, (num.psi - r * den.psi) / den.value)


def gap_closed(t_few: Est, x_few: Est, t_many: Est) -> Est:
    """The share of the teacher's few-vs-many-step gap that model X closes at few steps:
    (T_few - X_few) / (T_few - T_many). 0: no better than the teacher at few steps; 1: as good at
    few steps as the teacher at many. Unlike the gap X_few - X_many, getting worse at many steps
    cannot improve it."""
    return ratio(t_few - x_few, t_few - t_many)


@dataclass(frozen=True)
class Frontier:
    """A model's quality-vs-entropy curve at one step count: one point per sampling temperature."""

    temperatures: list[float]
    entropy: list[Est]
    nll: list[Est]


def sample_nll(row: dict) -> Est:
    """A row's quality as an estimate over its samples: the exact NLL per token under a synthetic
    source (the mean of ``nll_per_sample``), or for text the judge's NLL per scored token, i.e.
    log gen-PPL: a ratio of sums over samples (``gen_nll_sum_per_sample`` / ``judge_tokens_per_sample``)."""
    if row.get("nll_per_sample") is not None:
        return mean(row["nll_per_sample"])
    if row.get("gen_nll_sum_per_sample") is not None:
        return ratio(mean(row["gen_nll_sum_per_sample"]), mean(row["judge_tokens_per_sample"]))
    raise KeyError("row has no per-sample quality (nll_per_sample or gen_nll_sum_per_sample)")


def has_sample_nll(row: dict) -> bool:
    return row.get("nll_per_sample") is not None or row.get("gen_nll_sum_per_sample") is not None


def frontier(rows: Sequence[dict]) -> Frontier:
    """From evaluation rows of one model at one step count (any temperatures; each with
    ``entropy_per_sample`` and a per-sample quality, ``sample_nll``), ordered by entropy."""
    pts = sorted(rows, key=lambda r: float(np.mean(r["entropy_per_sample"])))
    return Frontier([float(r["temperature"]) for r in pts], [mean(r["entropy_per_sample"]) for r in pts],
                    [sample_nll(r) for r in pts])


@dataclass(frozen=True)
class AtEntropy:
    est: Est
    extrapolated: bool  # the target entropy lies outside the swept range (a linear extrapolation)


def nll_at_entropy(f: Frontier, target: float) -> AtEntropy | None:
    """The NLL read off the frontier at entropy ``target`` by linear interpolation between the two
    swept points that bracket it (or the two nearest, extrapolating, when none does), with the
    delta-method influence of all four point estimates. None with fewer than 2 distinct points.

    With N(H) linear between (H_a, N_a) and (H_b, N_b) and w = (target - H_a) / (H_b - H_a):
    value = N_a + w (N_b - N_a); d/dN_a = 1 - w, d/dN_b = w, d/dH_a = slope (w - 1), d/dH_b = -slope w.
    """
    h = [e.value for e in f.entropy]
    if len(h) < 2 or max(h) - min(h) <= 0:
        return None
    j = int(np.searchsorted(h, target)) - 1  # h sorted ascending: bracket [j, j + 1]
    a = min(max(j, 0), len(h) - 2)
    b = a + 1
    d = h[b] - h[a]
    if d == 0:
        return None
    w = (target - h[a]) / d
    slope = (f.nll[b].value - f.nll[a].value) / d
    value = f.nll[a].value + w * (f.nll[b].value - f.nll[a].value)
    psi = ((1 - w) * f.nll[a].psi + w * f.nll[b].psi
           + slope * (w - 1) * f.entropy[a].psi - slope * w * f.entropy[b].psi)
    return AtEntropy(Est(value, psi), extrapolated=not (h[0] <= target <= h[-1]))


def t_interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and a 95% Student-t confidence interval over independent repeats (training seeds)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    m = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": m, "sd": None, "lo": None, "hi": None}
    sd = float(x.std(ddof=1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "sd": sd, "lo": m - half, "hi": m + half}


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a 95% two-sided interval);
    tabulated to df = 30, the normal's 1.96 beyond."""
    if df < 1:
        raise ValueError(f"t quantile: df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96
