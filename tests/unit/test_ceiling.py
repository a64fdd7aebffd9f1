"""tools/ceiling.py: one table per round from the trained and the exact arm of each (chain, seed)."""
from __future__ import annotations

import json
import shutil

import numpy as np

from tests.helpers import REPO
from tools import ceiling
from trainer.config import PLAIN_SAMPLER, load_config, save_config
from trainer.layout import RunLayout


def _report(summary: dict, round_steps: dict) -> dict:
    return {"summary": summary, "round_steps": round_steps}


def _teacher_eval(run, per_sample: dict[int, list[float]]) -> None:
    rows = [{"model": "teacher", "round": 0, "steps": n, "temperature": 1.0, "sampler": PLAIN_SAMPLER,
             "nll_per_sample": v} for n, v in per_sample.items()]
    rows.append({"model": "teacher", "round": 0, "steps": 8, "temperature": 1.0, "sampler": "min_p-0.1",
                 "nll_per_sample": [0.0] * 4})  # a free sampler's row: not the teacher's plain row
    path = RunLayout(run).eval_metrics(0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"rows": rows}))


def _run(root, chain, seed, shift):
    trained = root / f"chain-{chain}" / "trained" / f"seed-{seed}"
    trained.mkdir(parents=True)
    (trained / "report.json").write_text(json.dumps(_report(
        {"r1/teacher_nll": 1.5 + shift, "r1/student_nll": 1.4 + shift, "r1/control_nll": 1.5 + shift,
         "r1/student_minus_best": -0.05, "r1/student_minus_control": -0.1 + shift,
         "r1/teacher_nll_at_H": 1.4 + shift, "r2/student_nll": 2.0}, {"0": 16, "1": 8, "2": 4})))
    _teacher_eval(trained, {8: [1.5 + shift, 1.7 + shift, 1.3 + shift, 1.5 + shift], 4: [2.2] * 4})
    exact = root / f"chain-{chain}" / "exact" / f"seed-{seed}"
    exact.mkdir(parents=True)
    (exact / "report.json").write_text(json.dumps(_report(
        {"r1/teacher_nll": 1.3, "r1/student_nll": 1.35, "r1/ideal_nll": 1.2, "r1/ideal_gain": 0.1,
         "r1/achieved_over_ideal": -0.5, "r1/teacher_nll_at_H": 1.25}, {"0": 16, "1": 8})))
    _teacher_eval(exact, {8: [1.2, 1.4, 1.2, 1.4], 4: [2.0] * 4})


def test_the_table_joins_both_arms_per_seed_and_aggregates_per_chain_and_over_all(tmp_path):
    for chain, seeds in (("1", (0, 1, 2)), ("2", (0, 1))):
        for s in seeds:
            _run(tmp_path, chain, s, shift=0.01 * s)
    (tmp_path / "chain-2" / "trained" / "seed-9").mkdir()  # unfinished: no report, not counted
    chains = ceiling.collect(tmp_path)
    assert sorted(chains) == ["1", "2"] and sorted(chains["2"]) == [0, 1]
    r1 = chains["1"][2]["r1"]
    assert np.isclose(r1["best_sampler"], 1.42 + 0.05)  # student − (student − best)
    assert np.isclose(r1["trained_minus_exact_teacher"], 1.52 - 1.3)  # the means of the plain rows, per sample
    assert np.isclose(r1["exact_teacher"], 1.3) and np.isclose(r1["trained_minus_exact_teacher_at_H"], 0.17)
    assert np.isclose(r1["exact_achieved_gain"], -0.05) and r1["exact_achieved_over_ideal"] == -0.5
    r2 = chains["1"][0]["r2"]  # the exact arm distils one round: no ideal at N = 4, the exact teacher still
    assert r2["ideal"] is None and r2["exact_student"] is None and np.isclose(r2["trained_minus_exact_teacher"], 0.2)
    agg = ceiling.aggregate(chains)
    one = agg["r1"]["student_minus_control"]
    assert one["1"]["n"] == 3 and np.isclose(one["1"]["mean"], -0.09) and one["all"]["n"] == 5
    assert np.isclose(one["all"]["mean"], np.mean([-0.1, -0.09, -0.08, -0.1, -0.09]))
    text = ceiling.markdown(agg, chains, {"1": 8, "2": 4})
    assert "## Round 1 (N = 8 steps)" in text and "| achieved / ideal (from the exact teacher) | -50.0%" in text
    assert "chain 1: seeds 0, 1, 2; chain 2: seeds 0, 1" in text


def test_a_seed_without_its_exact_arm_has_no_exact_cells(tmp_path):
    _run(tmp_path, "1", 0, shift=0.0)
    shutil.rmtree(tmp_path / "chain-1" / "exact")
    r1 = ceiling.collect(tmp_path)["1"][0]["r1"]
    assert r1["exact_teacher"] is None and r1["ideal"] is None and "trained_minus_exact_teacher" not in r1
    assert np.isclose(r1["student"], 1.4)


def _one_round(run, summary):
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(_report(summary, {"0": 16, "1": 8})))


def test_the_budget_curve_compares_the_same_runs_at_every_budget(tmp_path):
    for s in (0, 1, 2):  # the ceiling runs (400 updates); seed 2 has no larger budget
        for arm, gain in (("exact", 0.01 * s), ("trained", 0.05)):
            _one_round(tmp_path / "chain-7" / arm / f"seed-{s}",
                       {"r1/teacher_nll": 1.3, "r1/student_nll": 1.3 - gain, "r1/student_minus_teacher": -gain,
                        "r1/achieved_over_ideal": gain / 0.1})
    save_config(load_config(REPO / "configs" / "tiny-regime.yaml"), tmp_path / "chain-7/trained/seed-0/config.yaml")
    for s in (0, 1):
        _one_round(tmp_path / "budget-1600/chain-7/exact" / f"seed-{s}",
                   {"r1/teacher_nll": 1.3, "r1/student_nll": 1.2 - 0.01 * s, "r1/achieved_over_ideal": 1.0 + 0.1 * s})
        _one_round(tmp_path / "budget-1600/chain-7/trained" / f"seed-{s}", {"r1/student_minus_teacher": -0.08})
    curve = ceiling.collect_budget(tmp_path, 400)
    assert list(curve) == [400, 1600] and sorted(curve[400]["7"]) == [0, 1]  # seed 2: not at every budget
    assert np.isclose(curve[1600]["7"][1]["exact_gain"], 0.11) and np.isclose(curve[400]["7"][1]["trained_gain"], 0.05)
    agg = ceiling.aggregate_budget(curve)
    assert np.isclose(agg[1600]["exact_gain"]["change"]["mean"], np.mean([0.1 - 0.0, 0.11 - 0.01]))
    assert np.isclose(agg[1600]["trained_gain"]["change"]["mean"], 0.03)
    assert agg[400]["exact_achieved_over_ideal"]["all"]["n"] == 2
    assert ceiling.main(["--run-dir", str(tmp_path), "--budget"]) == 0
    text = (tmp_path / "budget.md").read_text()
    assert "| 1600 | achieved / ideal (exact teacher) | 105.0% [" in text


def test_the_start_gap_fit_recovers_a_known_line_and_the_share_covered():
    def rec(gap, gain):  # exact teacher 1.3, ideal 1.2, the student starts at the trained teacher 1.3 + gap
        return {"r1": {"trained_minus_exact_teacher": gap, "exact_achieved_gain": gain, "ideal": 1.2,
                       "ideal_gain": 0.1, "exact_student": 1.3 - gain, "trained_teacher": 1.3 + gap}}
    chains = {"1": {s: rec(g, 0.08 - 0.5 * g) for s, g in enumerate((0.0, 0.1, 0.2))}, "2": {0: rec(0.05, 0.055)}}
    fit = ceiling.start_gap_fit(chains)
    assert np.isclose(fit["slope"], -0.5) and np.isclose(fit["intercept"], 0.08) and np.isclose(fit["r"], -1.0)
    assert np.isclose(fit["intercept_over_ideal"], 0.8)
    assert np.isclose(fit["runs"][1]["covered"], (0.1 + 0.03) / (0.1 + 0.1))  # (start - student) / (start - ideal)
    assert ceiling.start_gap_fit({"1": {0: rec(0.1, 0.0)}}) is None  # too few runs for a line
    assert "an analysis chosen after looking" in "\n".join(ceiling._fit_markdown(fit))
