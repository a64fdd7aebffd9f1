"""A run may start from another run's teacher (tools/seeds.py --teacher-from, cluster/pipeline.py adopt):
it copies the teacher stages' folders and done records, then runs only its own rounds; it refuses a
config that differs outside distill.*/targets.*, a source whose products changed, and a started run."""
from __future__ import annotations

import json

import pytest

from cluster import pipeline
from tests.helpers import REPO
from tools import seeds
from trainer.config import load_config, save_config
from trainer.layout import RunLayout

CONFIG = str(REPO / "configs" / "tiny-regime.yaml")
SHARED = ["data.synthetic.seed=99"]


def _teacher_run(path, overrides):
    """A run folder whose teacher stages are done (their products stand in for the real ones)."""
    cfg = load_config(CONFIG, seeds.seed_args(CONFIG, overrides, 0))
    save_config(cfg, path / "config.yaml")
    chain = pipeline.build_chain(cfg)
    for st in chain:
        if st.name in pipeline.TEACHER_STAGES:
            (path / st.product).parent.mkdir(parents=True, exist_ok=True)
            (path / st.product).write_text(json.dumps({"stage": st.name}))
            pipeline.mark(path, st, "done")
    (RunLayout(path).root / "teacher" / "checkpoints").mkdir()
    (RunLayout(path).root / "teacher" / "checkpoints" / "w.bin").write_bytes(b"weights")
    return chain


def test_a_new_budget_runs_only_its_rounds_on_the_adopted_teacher(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _teacher_run(src, SHARED)
    budget = [*SHARED, "distill.rounds=1", "distill.steps_per_round=1600", "targets.num_samples=32768"]
    seeds.adopt_teacher(CONFIG, budget, 0, src, dst)
    chain = pipeline.build_chain(load_config(CONFIG, seeds.seed_args(CONFIG, budget, 0)))
    todo = [st.name for st in pipeline.pending(dst, chain)]
    assert todo[0] == "targets_1" and not set(todo) & set(pipeline.TEACHER_STAGES)
    assert (dst / "teacher" / "checkpoints" / "w.bin").read_bytes() == b"weights"
    assert pipeline.read_state(dst)["stages"]["teacher"]["adopted_from"] == str(src)
    with pytest.raises(RuntimeError, match="has started already"):  # never over a run in progress
        pipeline.adopt(src, dst, chain)


def test_adoption_refuses_another_evaluation_and_a_changed_teacher(tmp_path):
    src = tmp_path / "src"
    chain = _teacher_run(src, SHARED)
    with pytest.raises(SystemExit, match="differs at eval.num_samples"):
        seeds.adopt_teacher(CONFIG, [*SHARED, "eval.num_samples=64"], 0, src, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing written before the check
    teacher = next(st for st in chain if st.name == "teacher")
    (src / teacher.product).write_text("another teacher")  # its record no longer matches
    with pytest.raises(RuntimeError, match="teacher not done"):
        seeds.adopt_teacher(CONFIG, SHARED, 0, src, tmp_path / "b")
    assert not (tmp_path / "b").exists()
