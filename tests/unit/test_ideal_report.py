"""The report against the ceiling (trainer/evaluation/compare.py ``against_ideal``, report.py): achieved
gain / ideal gain with its paired SE, at temperature 1 and at the data's entropy, from evaluation files
written as trainer/jobs/evaluate.py writes them; and a report without an ideal row keeps its shape."""
from __future__ import annotations

import json
import math

import numpy as np

from trainer.evaluation.ideal import merge_repeats
from trainer.evaluation.report import collect, markdown

N = 400
TEMPS = (0.8, 0.9, 1.0)


def _row(rng, noise, steps, temperature, level, entropy):
    nll = level + noise + 0.05 * rng.standard_normal(N)
    ent = entropy + 0.4 * (temperature - 1.0) + 0.02 * rng.standard_normal(N)
    return {"steps": steps, "temperature": temperature, "nll": float(nll.mean()), "nll_se": 0.01,
            "entropy": float(ent.mean()), "nll_per_sample": nll.tolist(), "entropy_per_sample": ent.tolist()}


def _write(run, folder, body):
    d = run / folder / "eval"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(body))


def _run(tmp_path, with_ideal: bool):
    rng = np.random.default_rng(0)
    noise = 0.3 * rng.standard_normal(N)  # what the paired rows share (the sampling noise)
    teacher = [_row(rng, noise, 8, t, 1.30 + 0.6 * (t - 1), 2.24) for t in TEMPS]
    teacher.append(_row(rng, noise, 16, 1.0, 0.97, 2.23))
    student = [_row(rng, noise, 8, t, 1.22 + 0.6 * (t - 1), 2.23) for t in TEMPS]
    body = {"model": "teacher", "round": 0, "round_steps": 16, "rows": teacher, "entropy_rate": 0.6, "nll_floor": 0.66}
    if with_ideal:
        ideal = []
        for t in TEMPS:  # two rollout sets sharing the sampling noise
            sets = [_row(rng, noise, 8, t, 1.18 + 0.6 * (t - 1) + 0.01 * k, 2.235) for k in range(2)]
            ideal.append(merge_repeats(sets))
        body["ideal"] = {"round": 1, "steps": 8, "rollouts": 16, "repeats": 2, "rows": ideal}
    _write(tmp_path, "teacher", body)
    _write(tmp_path, "round_1", {"model": "student", "round": 1, "round_steps": 8, "rows": student,
                                 "entropy_rate": 0.6, "nll_floor": 0.66})
    ref = {"nll": 0.66, "nll_se": 0.01, "samples": N, "entropy": 2.20, "bigram_kl": 0.01}
    return collect(tmp_path, 1, control=False, ref=ref), teacher, student, (body.get("ideal") or {}).get("rows")


def test_achieved_over_ideal_is_the_paired_ratio_of_gains(tmp_path):
    report, teacher, student, ideal = _run(tmp_path, with_ideal=True)
    c = report["comparisons"][0]
    t = np.array(teacher[2]["nll_per_sample"])
    s = np.array(student[2]["nll_per_sample"])
    i = np.array(ideal[2]["nll_per_sample"])
    r = (t - s).mean() / (t - i).mean()
    psi = ((t - s) - (t - s).mean() - r * ((t - i) - (t - i).mean())) / (t - i).mean()
    assert math.isclose(c["achieved_over_ideal"]["value"], r, rel_tol=1e-5)
    assert math.isclose(c["achieved_over_ideal"]["se"], psi.std(ddof=1) / math.sqrt(N), rel_tol=1e-4)
    # the Monte Carlo SE of the ideal row: SD of the two rollout sets' means / sqrt(2), carried to the ratio
    sets = ideal[2]["nll_repeats"]
    assert math.isclose(c["ideal_nll"]["mc_se"], abs(sets[0] - sets[1]) / 2, rel_tol=1e-4)
    assert math.isclose(c["achieved_over_ideal"]["mc_se"], abs(r / (t - i).mean()) * abs(sets[0] - sets[1]) / 2,
                        rel_tol=1e-3)
    # at the data's entropy: each model read off its sweep, the ratio of the read gains
    h = c["round_teacher_nll_at_H"]["value"] - c["ideal_nll_at_H"]["value"]
    assert math.isclose(c["ideal_gain_at_H"]["value"], h, rel_tol=1e-5)
    assert c["achieved_over_ideal_at_H"]["value"] is not None and c["ideal_nll_at_H"]["mc_se"] > 0
    assert report["summary"]["r1/achieved_over_ideal"] == c["achieved_over_ideal"]["value"]
    text = markdown(report)
    assert "## Against the ceiling" in text and f"{100 * r:.1f}" in text


def test_without_an_ideal_row_the_report_keeps_its_shape(tmp_path):
    report, *_ = _run(tmp_path, with_ideal=False)
    assert "ideal_nll" not in report["comparisons"][0]
    assert "r1/achieved_over_ideal" not in report["summary"]
    assert "Against the ceiling" not in markdown(report)
