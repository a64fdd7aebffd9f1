"""The evaluation's measures, declared once: what each is, which data measures it, and where it is shown.

Every measure a report, a table or TensorBoard shows is one ``Metric`` of ``METRICS`` (per-sample lists
and protocol names in metrics.json are not measures and are not declared here).
Its ``show`` gives its column in each view it appears in (views print in ascending column; a metric
absent from a view's ``show`` is not in it):

  ROW          report.json's rows: report.collect keeps these keys of every row (a set: no order)
  SWEEP        the keys the sweep's quality_row sets on every row, None where not measured (a set)
  TABLE        the fixed-width table of every evaluation (report.md's last section, the evaluate log)
  TENSORBOARD  ``eval/<model>/<name>@<steps>`` at temperature 1 and the plain sampler (the evaluate job)
  TEXT_TABLE   text_report's tables per step count
  FINAL        ``final/<model>/<name>`` in the run's hparams summary: each model at its own step count
  BOUND        text_report's table of the measures taken once per evaluation (the bound, LAMBADA)

report.py, sweep.py (``quality_row``, ``format_table``), the evaluate job (``tensorboard_scalars``) and
text_report read the views here, never a list of names of their own: a new metric is one ``Metric``
(with ``measure`` when it is a function of a row's samples) plus its test (docs/DESIGN.md, "Adding an
evaluation metric"). The columns keep the order each table had before this registry, so the reports
are unchanged byte for byte.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainer.data.prepared import MarkovSource

# Views (see the module docstring).
ROW, SWEEP, TABLE, TENSORBOARD, TEXT_TABLE, FINAL, BOUND = (
    "row", "sweep", "table", "tensorboard", "text_table", "final", "bound")
VIEWS = (ROW, SWEEP, TABLE, TENSORBOARD, TEXT_TABLE, FINAL, BOUND)
# The data that measures a metric (data.source).
SYNTHETIC, TEXT = "synthetic", "text"
BOTH = frozenset({SYNTHETIC, TEXT})
# Which way is better.
LOWER, HIGHER = "lower", "higher"
# What names a row; the tables of rows start with these columns.
IDENTITY = ("model", "round", "steps", "temperature", "sampler")


@dataclass(frozen=True)
class Metric:
    name: str  # its key in metrics.json and report.json
    label: str  # what it is, for a reader
    unit: str = ""  # nats/token, nats, a share, ... ("" for counts and plain numbers)
    better: str = ""  # LOWER, HIGHER, or "" (a count, a cost, a standard error)
    sources: frozenset[str] = BOTH  # the data that measures it (SYNTHETIC, TEXT)
    per_evaluation: bool = False  # one value per evaluation (metrics.json's top level), not per row
    header: str = ""  # its column heading where not its name
    digits: int = 4  # decimals of a float in the tables
    show: Mapping[str, int] = field(default_factory=dict)  # view -> its column there
    # For a measure of a row's samples (int [n, L]): f(samples, source) -> value, called by the sweep's
    # quality_row on every row of a data source in ``sources`` (source: the MarkovSource, or None).
    measure: Callable[[np.ndarray, MarkovSource | None], float | None] | None = None


_EXACT = frozenset({SYNTHETIC})  # against the synthetic source's exact law
_TEXT = frozenset({TEXT})  # the text protocol (trainer/evaluation/text.py)

METRICS: tuple[Metric, ...] = (
    Metric("nll", "exact NLL of the samples under the source (mean over sequences)", "nats/token", LOWER, _EXACT,
           show={ROW: 0, SWEEP: 1, TABLE: 1, TENSORBOARD: 1, FINAL: 1}),
    Metric("nll_se", "standard error of nll over sequences", "nats/token", sources=_EXACT,
           show={ROW: 0, SWEEP: 2, TABLE: 2}),
    Metric("nll_gap", "nll minus the source's entropy per token (a perfect sampler: 0 on average)", "nats/token",
           LOWER, _EXACT, show={ROW: 0, SWEEP: 3}),
    Metric("gen_ppl", "generative perplexity under the judge, exp(gen_nll)", "", LOWER,
           show={ROW: 0, SWEEP: 5, TABLE: 5, TENSORBOARD: 4, TEXT_TABLE: 1, FINAL: 2}),
    Metric("gen_nll", "the judge's NLL of the samples per scored token", "nats/token", LOWER, _TEXT,
           show={ROW: 0}),
    Metric("entropy", "sample entropy: each sequence's unigram entropy, the mean over sequences", "nats",
           show={ROW: 0, TABLE: 3, TENSORBOARD: 2, TEXT_TABLE: 2, FINAL: 3}),
    Metric("entropy_se", "standard error of entropy over sequences", "nats", show={ROW: 0}),
    Metric("gen_entropy", "the unigram entropy of exactly the tokens gen_ppl scored, the mean over samples",
           "nats", sources=_TEXT, show={TEXT_TABLE: 3, FINAL: 4}),
    Metric("bigram_kl", "KL(source bigram law || the samples' bigram frequencies)", "nats", LOWER, _EXACT,
           show={ROW: 0, SWEEP: 4, TABLE: 4, TENSORBOARD: 3, FINAL: 6}),
    Metric("invalid_rate", "share of transitions outside the source's support", "share", LOWER, _EXACT,
           show={ROW: 0, SWEEP: 6}),
    Metric("invalid_rate_se", "standard error of invalid_rate over sequences", "share", sources=_EXACT,
           show={ROW: 0, SWEEP: 7}),
    Metric("valid_nll", "-log P per transition inside the source's support (nearly free of the leak)",
           "nats/transition", LOWER, _EXACT, show={ROW: 0, SWEEP: 8}),
    Metric("valid_nll_se", "standard error of valid_nll (delta method)", "nats/transition", sources=_EXACT,
           show={ROW: 0, SWEEP: 9}),
    Metric("mauve", "MAUVE of the samples against held-out text (eval.mauve_protocol)", "", HIGHER, _TEXT,
           show={ROW: 0, TENSORBOARD: 5, TEXT_TABLE: 4, FINAL: 5}),
    Metric("mauve_std", "standard deviation of MAUVE over MAUVE seeds (eval.mauve_protocol=sdtt)", "",
           sources=_TEXT, show={TEXT_TABLE: 5}),
    Metric("judge_tokens", "tokens the judge scored for gen_ppl", "tokens", sources=_TEXT, show={TEXT_TABLE: 6}),
    Metric("samples", "samples in the row", "samples", show={ROW: 0, TEXT_TABLE: 7}),
    Metric("nfe", "denoiser calls to draw the row's samples", "calls", show={ROW: 0}),
    Metric("seconds", "wall time to draw and measure the row", "s", show={ROW: 0}),
    Metric("nll_mc_se", "Monte Carlo standard error of the ideal student's nll (its rollouts)", "nats/token",
           sources=_EXACT, show={ROW: 0}),
    Metric("elbo_nll", "MDLM's NLL bound on held-out rows (fixed noise)", "nats/token", LOWER, _TEXT,
           per_evaluation=True, show={BOUND: 1, FINAL: 7}),
    Metric("elbo_nll_se", "standard error of elbo_nll over rows", "nats/token", sources=_TEXT, per_evaluation=True,
           show={BOUND: 2}),
    Metric("elbo_ppl", "the perplexity bound, exp(elbo_nll)", "", LOWER, _TEXT, per_evaluation=True,
           show={BOUND: 3}),
    Metric("elbo_rows", "held-out rows in the bound", "rows", sources=_TEXT, per_evaluation=True, header="rows",
           show={BOUND: 4}),
    Metric("lambada_acc", "LAMBADA last-word accuracy, as SDTT computes it", "share", HIGHER, _TEXT,
           per_evaluation=True, show={BOUND: 5, FINAL: 8}),
    Metric("lambada_ppl", "LAMBADA last-word perplexity, as SDTT computes it", "", LOWER, _TEXT,
           per_evaluation=True, show={BOUND: 6, FINAL: 9}),
)


def in_view(view: str, per_evaluation: bool | None = None) -> list[Metric]:
    """The metrics of ``view`` in its column order (registry order among equal columns); with
    ``per_evaluation`` only the per-row (False) or per-evaluation (True) ones."""
    if view not in VIEWS:
        raise ValueError(f"unknown metrics view {view!r}: one of {', '.join(VIEWS)}")
    chosen = [m for m in METRICS if view in m.show and per_evaluation in (None, m.per_evaluation)]
    return sorted(chosen, key=lambda m: m.show[view])  # sorted() is stable: ties keep the registry's order


def names(view: str, per_evaluation: bool | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in in_view(view, per_evaluation))


def columns(view: str) -> tuple[str, ...]:
    """A table's columns: what names a row (IDENTITY), then the view's metrics."""
    return IDENTITY + names(view)


def digits(column: str) -> int:
    """Decimals of a float in ``column`` (a metric's name or heading; 4 for any other column)."""
    return next((m.digits for m in METRICS if column in (m.name, m.header)), 4)


def measured(data_source: str) -> list[Metric]:
    """The metrics the sweep measures itself on each row's samples for ``data_source``."""
    return [m for m in METRICS if m.measure is not None and data_source in m.sources]


def tensorboard_scalars(model: str, row: dict) -> dict[str, float]:
    """A row's TensorBoard scalars, ``eval/<model>/<name>@<steps>``, where measured."""
    return {f"eval/{model}/{k}@{row['steps']}": row[k] for k in names(TENSORBOARD) if row.get(k) is not None}
