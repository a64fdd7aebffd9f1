"""trainer/evaluation/report.py: the report's markdown for an exact-likelihood and a text source."""
from __future__ import annotations

import pytest

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
    assert "## Per round" in text and "T_64" in text and "No likelihood" not in text


def _with(report: dict, **est: tuple[float, float]) -> dict:
    for c in report["comparisons"]:
        c.update({k: {"value": v, "se": se} for k, (v, se) in est.items()})
    return report


def test_the_first_lines_say_what_the_run_shows_about_sdtt():
    """An under-trained teacher (the control beats it by > 2 SE): the report opens by saying the
    students' gains measure more training; a student beyond the control says so; level says level."""
    text = markdown(_with(_report(2.5), control_minus_teacher=(-0.25, 0.02), student_minus_control=(0.14, 0.02)))
    head = text.split("## Per round")[0]
    assert "## In short" in head and "worse than the control, 0.140 ± 0.020" in head
    assert "the teacher was still learning" in head
    text = markdown(_with(_report(2.5), control_minus_teacher=(-0.003, 0.01), student_minus_control=(-0.066, 0.01)))
    head = text.split("## Per round")[0]
    assert "better than the control" in head and "beats the fair control at every round" in head
    assert "still learning" not in head
    head = markdown(_with(_report(2.5), control_minus_teacher=(0.0, 0.01), student_minus_control=(0.015, 0.01)))
    assert "level with (within 2 SE) the control" in head and "beats" not in head.split("## Per round")[0]
    assert "## In short" not in markdown(_report(None))


def test_text_report_without_a_judge_leaves_out_the_tables_it_cannot_fill():
    text = markdown(_report(None))
    assert "No likelihood for these samples" in text and "## Every evaluation" in text
    assert "## Per round" not in text and "T_None" not in text


def _text_eval(tmp_path, model: str, rnd: int, round_steps: int, rows: list[dict], ref: dict | None = None):
    import json

    d = tmp_path / {"teacher": "teacher", "control": "control"}.get(model, f"round_{rnd}") / "eval"
    d.mkdir(parents=True)
    body = {"model": model, "round": rnd, "round_steps": round_steps, "rows": rows, "entropy_rate": None,
            "nll_floor": None, "judge": "ar", "elbo_nll": 3.0, "elbo_nll_se": 0.1, "elbo_ppl": 20.0, "elbo_rows": 8}
    if ref is not None:
        body["reference"] = ref
    (d / "metrics.json").write_text(json.dumps(body))


def _text_row(rng, steps: int, temperature: float, level: float, entropy: float, n: int = 64) -> dict:
    """A text evaluation row as trainer/evaluation/text.py writes it: per-sample judge NLL sums and
    scored-token counts (no exact NLL), per-sample entropies."""
    tokens = rng.integers(20, 60, size=n)
    sums = tokens * (level + 0.3 * rng.standard_normal(n))
    ent = entropy + 0.05 * rng.standard_normal(n)
    return {"steps": steps, "temperature": temperature, "nll": None, "gen_nll": float(sums.sum() / tokens.sum()),
            "gen_ppl": None, "entropy": float(ent.mean()), "entropy_per_sample": ent.tolist(),
            "gen_nll_sum_per_sample": sums.tolist(), "judge_tokens_per_sample": tokens.tolist()}


def test_the_text_section_reads_the_layouts_evaluations_without_control_at_r(tmp_path):
    """text_report finds evaluations where RunLayout puts them (report.load_evals): each model at its
    own step count, the final control's values in final/control (control@1, matched to round 1 only,
    left out); a model not evaluated yet is left out, not an error."""
    import json

    from trainer.evaluation import text_report
    from trainer.evaluation.report import load_evals
    from trainer.layout import CONTROL, RunLayout

    at = RunLayout(tmp_path)

    def write(path, model, rnd, round_steps, ppl):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({
            "model": model, "round": rnd, "round_steps": round_steps, "judge": "ar", "tokenizer": "byte",
            "elbo_nll": 3.0, "elbo_nll_se": 0.1, "elbo_ppl": 20.0, "elbo_rows": 8,
            "rows": [{"steps": round_steps, "gen_ppl": ppl, "entropy": 4.0, "samples": 16}]}))

    write(at.eval_metrics(0), "teacher", 0, 8, 50.0)
    write(at.eval_metrics(1), "student", 1, 4, 60.0)
    write(at.eval_metrics(CONTROL), "control", 2, 2, 70.0)
    write(at.control_eval_metrics(1, 2), "control", 1, 4, 99.0)
    final = text_report.final_metrics(tmp_path, rounds=2, control=True)  # round 2 not evaluated yet
    assert final["final/teacher/gen_ppl"] == 50.0 and final["final/round_1/gen_ppl"] == 60.0
    assert final["final/control/gen_ppl"] == 70.0 and "final/round_2/gen_ppl" not in final
    md = text_report.markdown_section(tmp_path, rounds=2, control=True)
    assert "70.0" in md and "99.0" not in md
    write(at.eval_metrics(2), "student", 2, 2, 65.0)
    assert [ev["round"] for ev in load_evals(tmp_path, 2, control=True)] == [0, 1, 2, 2, 1]  # control@1 last


def test_text_report_compares_models_by_the_judges_nll_at_matched_entropy(tmp_path):
    """A text run with a judge gets the same paired tables as a synthetic one, in log gen-PPL: the
    student - teacher difference is the difference of the ratios of sums, and every model's value at
    the held-out text's entropy is read off its temperature sweep."""
    import numpy as np

    from trainer.evaluation.report import JUDGED, collect

    rng = np.random.default_rng(0)
    ref = {"model": "data", "samples": 64, "entropy": 3.0, "gen_nll": 2.0, "gen_ppl": 7.39}
    sweep = [(0.8, 2.8), (1.0, 3.1), (1.2, 3.4)]
    teacher = [_text_row(rng, s, 1.0, 4.0 - 0.2 * i, 3.1) for i, s in enumerate((4, 8, 16))]
    teacher += [_text_row(rng, 4, t, 4.0 + (t - 1), h) for t, h in sweep if t != 1.0]
    _text_eval(tmp_path, "teacher", 0, 8, teacher, ref)
    student = [_text_row(rng, 4, t, 3.7 + (t - 1), h) for t, h in sweep] + [_text_row(rng, 8, 1.0, 3.7, 3.1)]
    _text_eval(tmp_path, "student", 1, 4, student)
    control = [_text_row(rng, 4, t, 3.9 + (t - 1), h) for t, h in sweep]
    _text_eval(tmp_path, "control", 1, 4, control)

    report = collect(tmp_path, rounds=1, control=True)
    assert report["measure"] == JUDGED and report["data_entropy"] == 3.0
    (c,) = report["comparisons"]

    def gen_nll(row):
        return sum(row["gen_nll_sum_per_sample"]) / sum(row["judge_tokens_per_sample"])

    want = gen_nll(student[1]) - gen_nll(teacher[0])
    assert c["student_minus_teacher"]["value"] == pytest.approx(want, abs=1e-6)
    assert 0 < c["student_minus_teacher"]["se"] < 0.2
    assert c["teacher_nll_at_H"] is not None and not c["teacher_nll_at_H"]["extrapolated"]
    assert c["student_minus_control_at_H"]["value"] < 0  # the student's curve lies 0.2 below
    text = markdown(report)
    assert "log gen-PPL" in text and "held-out text rows" in text and "## Quality at matched diversity" in text
