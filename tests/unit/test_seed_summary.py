"""tools/seeds.py's summary keeps the 'extrapolated' flag of matched-entropy reads, and every training
seed gets its own evaluation seed; compare.summary carries the flag and the leak-free measures."""
from __future__ import annotations

import numpy as np

from tests.helpers import REPO
from tools import seeds
from trainer.evaluation import compare


def _row(model, rnd, steps, temperature, level, entropy, n=32, rng=None):
    rng = rng or np.random.default_rng(0)
    return {"model": model, "round": rnd, "steps": steps, "temperature": temperature,
            "nll_per_sample": list(level + rng.normal(0, 0.05, n)), "entropy_per_sample": list(np.full(n, entropy)),
            "entropy": entropy, "invalid_rate": 0.01 * level, "invalid_rate_se": 0.001, "valid_nll": level / 2,
            "valid_nll_se": 0.01}


def _summary(student_entropies: tuple[float, float], target: float = 2.2) -> dict:
    rows = []
    for model, rnd, ents in (("teacher", 0, (2.1, 2.3)), ("student", 1, student_entropies)):
        rows += [_row(model, rnd, 8, 0.8, 1.3, ents[0]), _row(model, rnd, 8, 1.0, 1.5, ents[1])]
    return compare.summary(compare.compare_all(rows, {1: 8}, target, None))


def test_summary_keeps_the_extrapolated_flag_and_the_leak_free_measures():
    inside, outside = _summary((2.1, 2.3)), _summary((2.25, 2.4))  # 2.2 lies below the second sweep
    assert inside["r1/student_nll_at_H_extrapolated"] == 0.0
    assert outside["r1/student_nll_at_H_extrapolated"] == 1.0
    assert outside["r1/student_minus_teacher_at_H_extrapolated"] == 1.0
    assert outside["r1/teacher_nll_at_H_extrapolated"] == 0.0
    assert inside["r1/student_invalid_rate"] == 0.015 and inside["r1/student_valid_nll"] == 0.75


def test_seeds_markdown_marks_a_seed_whose_read_was_extrapolated():
    reports = {0: {"summary": _summary((2.1, 2.3)), "round_steps": {"1": 8}},
               1: {"summary": _summary((2.25, 2.4)), "round_steps": {"1": 8}}}
    text = seeds.markdown(seeds.aggregate(reports), reports, {"config": "x"})
    line = next(ln for ln in text.splitlines() if ln.startswith("| student NLL at data entropy |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert not cells[1].endswith("*") and cells[2].endswith("*") and cells[3].endswith("*")
    teacher = next(ln for ln in text.splitlines() if ln.startswith("| teacher NLL at data entropy |"))
    assert "*" not in teacher
    assert "extrapolated beyond that seed's temperature sweep" in text
    assert "| student invalid-transition rate |" in text


def test_every_training_seed_gets_its_own_evaluation_seed():
    cfg = str(REPO / "configs" / "tiny-regime.yaml")
    base = seeds.eval_seed(cfg, [], 0)
    assert [seeds.eval_seed(cfg, [], s) for s in range(4)] == [base, base + 1, base + 2, base + 3]
    assert seeds.eval_seed(cfg, ["eval.seed=40"], 2) == 42


def test_an_override_names_its_training_seed():
    got = seeds.seed_overrides(["teacher.init_from=runs/r/seed-{seed}/teacher/export",
                                "eval.samplers=[{name: c, grid: cosine}]"], 3)
    assert got == ["teacher.init_from=runs/r/seed-3/teacher/export", "eval.samplers=[{name: c, grid: cosine}]"]
