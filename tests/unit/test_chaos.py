"""tools/chaos.py's pure parts: the kill plan and the comparison that decides "bit-identical" (the
process-tree kill: tests/tools/test_kill_tree.py; the whole tool runs in tests/pipeline/test_chaos.py)."""
import json
import random

import pytest
import torch
from safetensors.torch import save_file

from tools.chaos import Kill, compare, next_kill, plan_kills, strip_timings

DURATIONS = {"prepare": 2.0, "teacher": 40.0, "eval_0": 4.0, "targets_1": 5.0, "distill_1": 30.0, "report": 3.0}


def test_the_plan_hits_every_stage_in_chain_order_and_is_seeded():
    plan = plan_kills(DURATIONS, 20, random.Random(3))
    assert len(plan) == 20
    stages = [k.stage for k in plan]
    assert set(stages) == set(DURATIONS)
    assert stages == sorted(stages, key=list(DURATIONS).index)  # chain order: a kill never waits on a done stage
    firsts = {}
    for k in plan:
        firsts.setdefault(k.stage, k.fraction)
    assert all(0.05 <= f <= 0.5 for f in firsts.values())  # the first of each stage falls early in it
    assert all(0.05 <= k.fraction <= 0.9 for k in plan)
    assert plan == plan_kills(DURATIONS, 20, random.Random(3))
    assert plan != plan_kills(DURATIONS, 20, random.Random(4))


def test_the_long_stages_get_the_extra_kills():
    counts = {s: 0 for s in DURATIONS}
    for seed in range(50):
        for k in plan_kills(DURATIONS, 20, random.Random(seed)):
            counts[k.stage] += 1
    assert counts["teacher"] > counts["distill_1"] > counts["targets_1"] > counts["report"]


def test_a_leftover_kill_never_waits_in_front_of_a_stage_own_kills():
    names = list(DURATIONS)
    # teacher outlived its second kill; eval_0 and targets_1 still have their own
    todo = [Kill("teacher", 0.9), Kill("eval_0", 0.3), Kill("targets_1", 0.2)]
    assert next_kill(todo, "eval_0", names) == 1
    assert next_kill(todo, "targets_1", names) == 2
    assert next_kill(todo, "distill_1", names) == 0  # no own kill: the leftover lands here
    assert next_kill([Kill("report", 0.1)], "distill_1", names) is None  # never before its stage
    assert next_kill([], "teacher", names) is None


def test_fewer_kills_than_stages_is_refused():
    with pytest.raises(ValueError, match="every one of the 6 stages"):
        plan_kills(DURATIONS, 5, random.Random(0))


def _run(root, weights, report):
    (root / "teacher" / "export").mkdir(parents=True)
    save_file(weights, str(root / "teacher" / "export" / "model.safetensors"))
    (root / "report.json").write_text(json.dumps(report))
    return root


def test_identical_runs_compare_equal_timings_aside(tmp_path):
    w = {"a": torch.arange(6, dtype=torch.float32)}
    a = _run(tmp_path / "a", w, {"rows": [{"nll": 1.5, "seconds": 3.0}], "time": "x"})
    b = _run(tmp_path / "b", w, {"rows": [{"nll": 1.5, "seconds": 9.0}], "time": "y"})
    assert compare(a, b) == {}
    assert strip_timings({"rows": [{"nll": 1, "seconds": 2}]}) == {"rows": [{"nll": 1}]}


def test_a_differing_tensor_and_number_are_named(tmp_path):
    w = torch.arange(6, dtype=torch.float32)
    a = _run(tmp_path / "a", {"a": w}, {"rows": [{"nll": 1.5}]})
    b = _run(tmp_path / "b", {"a": w + torch.tensor([0, 0, 0, 0, 0, 0.5])}, {"rows": [{"nll": 1.25}]})
    diffs = compare(a, b)
    assert diffs["teacher/export/model.safetensors"] == ["a: 1 of 6 values differ, largest by 0.5"]
    assert diffs["report.json"] == ["rows[0].nll: reference 1.5 != chaos 1.25"]
    (b / "teacher" / "export" / "model.safetensors").unlink()
    assert compare(a, b)["teacher/export/model.safetensors"] == ["only in reference"]
