"""trainer/evaluation/report.py: the report's markdown for an exact-likelihood and a text source."""
from __future__ import annotations

from trainer.evaluation.report import markdown

KEYS = ("teacher", "control", "student")


def _comparison(nll: float | None) -> dict:
    """One round's comparison row; every estimate is {value, se} or None (a text source has no NLL)."""
    est = None if nll is None else {"value": nll, "se": 0.01}
    row = {"round": 1, "steps": 8, "teacher_most_steps": None if nll is None else 64}
    for k in ("student_minus_teacher", "student_minus_control", "control_minus_teacher", "student_minus_teacher_2n",
              "gap_closed_student", "gap_closed_control", "teacher_2n_nll",
              *(f"{m}_nll" for m in KEYS), *(f"{m}_nll_at_H" for m in KEYS),
              "student_minus_teacher_at_H", "student_minus_control_at_H", "control_minus_teacher_at_H"):
        row[k] = est
    for m in KEYS:
        row[f"{m}_entropy"] = None if nll is None else 3.3
        row[f"{m}_bigram_kl"] = None if nll is None else 0.1
    return row


def _report(nll: float | None) -> dict:
    return {"entropy_rate": None, "nll_floor": None, "reference": None, "data_entropy": None,
            "control_round": 1, "comparisons": [_comparison(nll)],
            "rows": [{"model": "teacher", "round": 0, "steps": 8, "temperature": 1.0, "nll": nll, "entropy": 3.3}]}


def test_exact_likelihood_report_has_the_paired_tables():
    text = markdown(_report(2.5))
    assert "## Per round" in text and "T_64" in text and "No exact likelihood" not in text


def test_text_report_leaves_out_the_nll_tables_it_cannot_fill():
    text = markdown(_report(None))
    assert "No exact likelihood" in text and "## Every evaluation" in text
    assert "## Per round" not in text and "T_None" not in text
