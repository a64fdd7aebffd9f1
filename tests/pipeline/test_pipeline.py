"""The whole chain on this machine (tools/submit.py --local), as `make demo` runs it, shortened."""
import json
import subprocess
import sys

import pytest

from tests.helpers import PIPELINE_OVERRIDES, REPO, TINY, env

# A shortened tiny pipeline (tests/helpers/): a teacher trained long enough to show the physics of
# step counts, two SDTT rounds (16 -> 8 -> 4 steps).
OVERRIDES = PIPELINE_OVERRIDES


def submit(*args, check=True):
    proc = subprocess.run([sys.executable, "tools/submit.py", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"submit {args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def demo_run(local_pipeline):
    # tests/conftest.py runs `submit --config TINY --local --run-dir ... *OVERRIDES` once per session
    # (tests/pipeline/test_slurm_pipeline.py compares its SLURM run with the same run).
    return local_pipeline.wait()


def test_every_stage_done_and_recorded(demo_run):
    state = json.loads((demo_run / "pipeline_state.json").read_text())["stages"]
    expected = ["prepare", "teacher", "eval_0", "targets_1", "distill_1", "eval_1", "targets_2", "distill_2",
                "eval_2", "report"]
    assert sorted(state) == sorted(expected)
    assert all(state[s]["status"] == "done" and len(state[s]["sha256"]) == 64 for s in expected)
    assert not (demo_run / "run.lock.json").exists(), "the submission must release the run folder's lock"


def test_report_puts_each_student_beside_the_teacher(demo_run):
    report = json.loads((demo_run / "report.json").read_text())
    assert report["entropy_rate"] > 0
    teacher = {r["steps"]: r for r in report["rows"] if r["model"] == "teacher"}
    # The teacher at every count a round reaches (16, 8, 4) and at the configured ones.
    assert {4, 8, 16, 64} <= set(teacher)
    for r in report["rows"]:
        for key in ("model", "round", "steps", "nll", "nll_se", "gen_ppl", "entropy", "samples", "bigram_kl"):
            assert key in r
        assert r["entropy"] > 0 and r["samples"] == 256
    comps = report["comparisons"]
    assert [(c["round"], c["steps"]) for c in comps] == [(1, 8), (2, 4)]
    for c in comps:  # paired differences, each with its SE, and the matched-entropy reads
        assert c["teacher_nll"]["value"] is not None and c["student_nll"]["value"] is not None
        assert c["student_minus_teacher"]["se"] > 0 and c["gap_closed_student"]["se"] > 0
        assert c["teacher_nll_at_H"] is not None and c["student_nll_at_H"] is not None
        assert c["student_minus_teacher_at_H"]["se"] > 0
    # the teacher is swept over eval.temperatures at every round's count, a student at its own
    temps = {(r["model"], r["round"], r["steps"]): set() for r in report["rows"]}
    for r in report["rows"]:
        temps[(r["model"], r["round"], r["steps"])].add(r["temperature"])
    assert temps[("teacher", 0, 8)] == temps[("student", 1, 8)] == {0.9, 1.0, 1.1}
    assert temps[("teacher", 0, 16)] == {1.0}  # the start count: no student is compared there
    assert temps[("student", 1, 4)] == {1.0}
    ref = report["reference"]
    assert abs(ref["nll"] - report["nll_floor"]) < 4 * ref["nll_se"] and ref["entropy"] == report["data_entropy"]
    assert (demo_run / "report.md").exists() and (demo_run / "quality_vs_steps.png").stat().st_size > 10_000
    assert (demo_run / "frontier.png").stat().st_size > 10_000
    ev = json.loads((demo_run / "round_1" / "eval" / "metrics.json").read_text())
    assert all(len(r["nll_per_sample"]) == 256 for r in ev["rows"])


def test_teacher_shows_the_physics_of_step_counts(demo_run):
    """Few steps unmask many neighbours together, independently: the exact NLL of the teacher's
    samples must fall as the number of steps rises (well beyond the standard errors)."""
    rows = json.loads((demo_run / "teacher" / "eval" / "metrics.json").read_text())["rows"]
    by_steps = {r["steps"]: r for r in rows}
    few, many = by_steps[4], by_steps[64]
    assert few["nll"] - many["nll"] > 4 * (few["nll_se"] + many["nll_se"]), (few, many)
    assert all(r["entropy"] > 1.0 for r in rows)  # sample entropy is reported beside it


def test_resubmitting_a_finished_run_does_nothing(demo_run):
    before = (demo_run / "pipeline_state.json").read_text()
    proc = submit("--run-dir", str(demo_run), "--local")
    assert "already done: prepare, teacher" in proc.stdout
    assert "[prepare]" not in proc.stdout and "[distill_1]" not in proc.stdout
    assert (demo_run / "pipeline_state.json").read_text() == before


def test_resubmitting_with_another_config_is_refused(demo_run):
    proc = submit("--config", str(TINY), "--local", "--run-dir", str(demo_run), "distill.rounds=3", check=False)
    assert proc.returncode == 2 and "distill.rounds" in proc.stderr
