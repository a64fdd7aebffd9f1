"""Measures that do not hinge on the source's ``leak`` constant: the invalid-transition rate and the
NLL of valid transitions beside the exact NLL (trainer/evaluation/quality.py ``support_split``)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from trainer.config import SyntheticConfig
from trainer.data.synthetic import MarkovSource
from trainer.evaluation.quality import exact_nll, support_split

CFG = SyntheticConfig(vocab_size=16, branching=3, concentration=0.5, seed=1234)


def test_support_and_transition_nll_match_the_dense_transition_matrix():
    src = MarkovSource(CFG)
    x = src.sample(64, 20, np.random.default_rng(0))
    x[:, 5] = (x[:, 4] + 7) % 16  # some transitions off the chain's support, most likely
    P = src.transition_matrix()
    prev, nxt = x[:, :-1], x[:, 1:]
    support = np.zeros((16, 16), bool)
    for i in range(16):
        support[i, src.succ[i]] = True
    assert np.array_equal(src.in_support(x), support[prev, nxt])
    assert np.allclose(src.transition_nll(x), -np.log(P[prev, nxt]), rtol=0, atol=1e-12)
    # The exact NLL is the stationary start plus these transitions.
    whole = -(np.log(src.stationary[x[:, 0]]) - src.transition_nll(x).sum(1)) / x.shape[1]
    assert np.allclose(src.nll_per_token(x), whole, atol=1e-12)


def test_the_split_is_free_of_the_leak_where_the_exact_nll_is_not():
    """The same samples scored by two sources that differ only in ``leak``: the exact NLL moves by
    whole nats per invalid transition, the invalid rate not at all, the valid NLL by ~log(1 - leak)."""
    a = MarkovSource(dataclasses.replace(CFG, leak=1e-3))
    b = MarkovSource(dataclasses.replace(CFG, leak=1e-6))
    assert np.array_equal(a.succ, b.succ)  # the leak does not change the chain's draw
    x = a.sample(2000, 32, np.random.default_rng(1))
    x[:100, 10] = (x[:100, 9] + 5) % 16
    sa, sb = support_split(a, x), support_split(b, x)
    assert sa["invalid_rate"] == sb["invalid_rate"] > 0
    assert abs(sa["valid_nll"] - sb["valid_nll"]) < 2e-3
    # The exact NLL moves by log(1e-3 / 1e-6) = 6.9 nats per invalid transition (over L tokens).
    moved = exact_nll(b, x).mean - exact_nll(a, x).mean
    per_invalid = math.log(1e-3 / 1e-6) * sa["invalid_rate"] * 31 / 32
    assert moved > 0.015 and moved == pytest.approx(per_invalid, abs=2e-3)


def test_the_split_counts_invalid_transitions_and_pools_valid_ones():
    src = MarkovSource(CFG)
    x = src.sample(3, 9, np.random.default_rng(2))
    ok = src.in_support(x)
    x[0, 1:] = x[0, :-1]  # a walk that mostly repeats a state: (almost) all self-transitions
    ok = src.in_support(x)
    out = support_split(src, x)
    assert out["invalid_rate"] == pytest.approx(float(np.mean(1 - ok.mean(1))))
    t = src.transition_nll(x)
    assert out["valid_nll"] == pytest.approx(float(t[ok].sum() / ok.sum()))
    assert out["invalid_rate_se"] > 0 and math.isfinite(out["valid_nll_se"])


def test_true_samples_leave_the_support_at_the_leaks_rate():
    """A jump (probability leak) lands outside the row's 3 successors with probability 13/16."""
    src = MarkovSource(dataclasses.replace(CFG, leak=0.05))
    x = src.sample(4000, 32, np.random.default_rng(3))
    out = support_split(src, x)
    want = 0.05 * 13 / 16
    assert abs(out["invalid_rate"] - want) < 5 * out["invalid_rate_se"]
    assert support_split(src, x[:, :1])["valid_nll"] is None
