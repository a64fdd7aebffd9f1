"""trainer/evaluation/metrics.py: the one declaration of the evaluation's measures is what the sweep,
report.py, the evaluate job's TensorBoard scalars and text_report read.

A metric registered only here, in a test-local registry, must reach every reader: real samples of a
synthetic source through the sweep's quality_row, real metrics.json files through report.collect and
text_report, real TensorBoard and metrics.jsonl files read back."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import scalars
from trainer.config import SyntheticConfig
from trainer.data.synthetic import MarkovSource
from trainer.evaluation import metrics, report, text_report
from trainer.evaluation.metrics import BOUND, FINAL, ROW, SWEEP, TABLE, TENSORBOARD, TEXT_TABLE, Metric
from trainer.evaluation.sweep import format_table, quality_row
from trainer.layout import RunLayout
from trainer.runtime.metrics import MetricsWriter


def _distinct_pairs(samples: np.ndarray, source) -> float:
    """Share of distinct adjacent pairs among all of them: a diversity measure nobody else computes."""
    pairs = {(int(a), int(b)) for row in samples for a, b in zip(row[:-1], row[1:])}
    return len(pairs) / (samples.shape[0] * (samples.shape[1] - 1))


DISTINCT = Metric("distinct_pairs", "share of distinct adjacent pairs", "share", metrics.HIGHER,
                  show={ROW: 0, SWEEP: 10, TABLE: 6, TENSORBOARD: 6, TEXT_TABLE: 8, FINAL: 7},
                  measure=_distinct_pairs)
PROBE = Metric("probe_acc", "a per-evaluation probe", "share", metrics.HIGHER, frozenset({metrics.TEXT}),
               per_evaluation=True, header="probe", show={BOUND: 7, FINAL: 10})


def test_the_views_are_the_columns_the_reports_had():
    """The registry reproduces each table's columns in their order (reports are compared byte for byte
    across the change that introduced it)."""
    ident = ("model", "round", "steps", "temperature", "sampler")
    assert metrics.columns(TABLE) == (*ident, "nll", "nll_se", "entropy", "bigram_kl", "gen_ppl")
    assert metrics.columns(TEXT_TABLE) == (*ident, "gen_ppl", "entropy", "gen_entropy", "mauve", "mauve_std",
                                           "judge_tokens", "samples")
    assert metrics.names(TENSORBOARD) == ("nll", "entropy", "bigram_kl", "gen_ppl", "mauve")
    assert metrics.names(FINAL, per_evaluation=False) == ("nll", "gen_ppl", "entropy", "gen_entropy", "mauve",
                                                          "bigram_kl")
    assert metrics.names(FINAL, per_evaluation=True) == ("elbo_nll", "lambada_acc", "lambada_ppl")
    assert [m.header or m.name for m in metrics.in_view(BOUND)] == ["elbo_nll", "elbo_nll_se", "elbo_ppl", "rows",
                                                                    "lambada_acc", "lambada_ppl"]
    assert set(metrics.names(SWEEP)) == {"nll", "nll_se", "nll_gap", "bigram_kl", "gen_ppl", "invalid_rate",
                                         "invalid_rate_se", "valid_nll", "valid_nll_se"}
    assert set(metrics.columns(ROW)) == {*ident, "nll", "nll_se", "nll_gap", "gen_ppl", "gen_nll", "entropy",
                                         "entropy_se", "bigram_kl", "invalid_rate", "invalid_rate_se", "valid_nll",
                                         "valid_nll_se", "mauve", "samples", "nfe", "seconds", "nll_mc_se"}


def test_every_metric_is_declared_whole():
    names = [m.name for m in metrics.METRICS]
    assert len(names) == len(set(names))
    for m in metrics.METRICS:
        assert m.label and m.better in (metrics.LOWER, metrics.HIGHER, "") and m.sources <= metrics.BOTH, m
        assert set(m.show) <= set(metrics.VIEWS), m
        assert not (m.per_evaluation and {ROW, SWEEP, TABLE, TENSORBOARD, TEXT_TABLE} & set(m.show)), m
    with pytest.raises(ValueError, match="unknown metrics view 'tabel'"):
        metrics.in_view("tabel")


def _eval(run_dir, ref, rnd: int, round_steps: int, rows: list[dict], **top) -> None:
    body = {"model": "teacher" if rnd == 0 else "student", "round": rnd, "round_steps": round_steps,
            "entropy_rate": None, "nll_floor": None, "rows": rows, **top}
    path = RunLayout(run_dir).eval_metrics(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def test_a_metric_registered_once_reaches_every_reader(monkeypatch, tmp_path):
    source = MarkovSource(SyntheticConfig(vocab_size=16, branching=3))
    x = torch.from_numpy(source.sample(32, 12, np.random.default_rng(0)).astype(np.int64))
    assert "distinct_pairs" not in quality_row(x, source, None)  # not declared: nobody knows it
    assert "distinct_pairs" not in format_table([{"model": "teacher"}])

    monkeypatch.setattr(metrics, "METRICS", metrics.METRICS + (DISTINCT, PROBE))
    want = _distinct_pairs(x.numpy(), source)
    assert 0 < want < 1

    # The sweep measures it on every row, synthetic or text.
    row = quality_row(x, source, None)
    assert row["distinct_pairs"] == pytest.approx(want, rel=0)
    assert quality_row(x, None, None)["distinct_pairs"] == pytest.approx(want, rel=0)

    # The evaluate job's TensorBoard scalars, written and read back.
    rows = [dict(row, steps=s, temperature=1.0, sampler="plain") for s in (4, 8)]
    tags = metrics.tensorboard_scalars("teacher", rows[0])
    assert tags["eval/teacher/distinct_pairs@4"] == want and "eval/teacher/nll@4" in tags
    with MetricsWriter(tmp_path / "tb_run", enabled=True) as mw:
        mw.scalars(0, tags)
    assert scalars(tmp_path / "tb_run", "eval/teacher/distinct_pairs@4") == [(0, pytest.approx(want))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb_run" / "tb")).Reload()
    assert "eval/teacher/distinct_pairs@4" in events.Tags()["scalars"]

    # report.json's rows and the table of every evaluation in report.md.
    _eval(tmp_path / "syn", 0, 0, 8, rows)
    _eval(tmp_path / "syn", 1, 1, 4, rows[:1])
    rep = report.collect(tmp_path / "syn", rounds=1)
    assert [r["distinct_pairs"] for r in rep["rows"]] == [want] * 3
    every = report.markdown(rep).split("## Every evaluation")[1]
    assert "distinct_pairs" in every.splitlines()[3] and f"{want:.4f}" in every

    # text_report: its tables per step count, the per-evaluation table, the final/ scalars.
    text_rows = [dict(quality_row(x, None, None), steps=s, temperature=1.0, sampler="plain") for s in (4, 8)]
    _eval(tmp_path / "txt", 0, 0, 8, text_rows, elbo_nll=3.0, elbo_nll_se=0.1, elbo_ppl=20.0, elbo_rows=8,
          probe_acc=0.25)
    section = text_report.markdown_section(tmp_path / "txt", rounds=0)
    heads = [line.split() for line in section.splitlines() if line.lstrip().startswith("model")]
    assert len(heads) == 3 and heads[0][-1] == heads[2][-1] == "distinct_pairs" and heads[1][-1] == "probe"
    final = text_report.final_metrics(tmp_path / "txt", rounds=0)
    assert final["final/teacher/distinct_pairs"] == pytest.approx(want) and final["final/teacher/probe_acc"] == 0.25
