"""The report's measures beside the entropy frontier: the teacher's validation bound against the
source's floor (read back from the run's real metrics files) and the bigram-KL frontier."""
from __future__ import annotations

from trainer.evaluation import report
from trainer.runtime.metrics import MetricsWriter


def test_teacher_bound_is_the_last_validation_nll_written_by_the_metrics_writer(tmp_path):
    assert report.teacher_bound(tmp_path) is None
    with MetricsWriter(tmp_path, enabled=True) as mw:
        mw.scalars(1000, {"val/nll": 0.80, "train/loss": 0.9})
        mw.scalars(2000, {"val/nll": 0.70})
        mw.scalars(2000, {"val/nll": 0.69})  # a resumed run repeats a step: the later line wins
        mw.scalars(2500, {"eval/teacher/nll@8": 1.4})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3000, "tag": "val/nll", "val')  # a line cut by a crash
    assert report.teacher_bound(tmp_path) == {"step": 2000, "value": 0.69}


def _pts(*triples):
    return [{"temperature": t, "entropy": 2.0 + t, "nll": n, "nll_se": 0.01, "bigram_kl": k} for t, k, n in triples]


def test_bigram_frontier_reads_each_sweep_at_its_lowest_kl_and_checks_dominance():
    rep = {"control_round": 2, "comparisons": [{"round": 1, "steps": 8}, {"round": 2, "steps": 4}],
           "frontiers": [
               {"model": "teacher", "round": 0, "steps": 8, "points": _pts((0.8, 0.08, 1.30), (1.0, 0.05, 1.45))},
               {"model": "teacher", "round": 0, "steps": 8, "sampler": "p9", "points": _pts((1.0, 0.01, 0.1))},
               {"model": "student", "round": 1, "steps": 8, "points": _pts((0.8, 0.07, 1.25), (1.0, 0.04, 1.40))},
               {"model": "teacher", "round": 0, "steps": 4, "points": _pts((0.8, 0.20, 2.0), (1.0, 0.15, 2.2))},
               {"model": "student", "round": 2, "steps": 4, "points": _pts((0.8, 0.25, 1.9), (1.0, 0.18, 2.1))}]}
    out = report.bigram_frontier(rep)
    assert out[0]["teacher"]["bigram_kl"] == 0.05 and out[0]["teacher"]["temperature"] == 1.0  # not p9's
    assert out[0]["student"]["nll"] == 1.40 and out[0]["control"] is None
    assert out[0]["student_dominates_teacher"] is True
    assert out[1]["student_dominates_teacher"] is False  # lower NLL, but a higher bigram KL everywhere


def test_quality_plot_draws_control_at_r_apart_from_the_last_control(tmp_path):
    def row(model, rnd, steps, nll):
        return {"model": model, "round": rnd, "steps": steps, "temperature": 1.0, "sampler": "plain", "nll": nll,
                "nll_se": 0.01, "entropy": 2.2}

    rep = {"control_round": 2, "nll_floor": 0.66,
           "rows": [row("teacher", 0, 4, 2.0), row("teacher", 0, 8, 1.5), row("control", 2, 4, 1.9),
                    row("control", 2, 8, 1.4), row("control", 1, 8, 1.45), row("student", 1, 8, 1.3),
                    {**row("teacher", 0, 8, 1.2), "sampler": "min_p-0.1"}]}
    fig = report.plot(rep, tmp_path / "q.png")
    lines = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}  # errorbar: (data line, caps, bars)
    assert {"teacher", "control", "control@1", "student round 1"} <= set(lines)
    assert list(lines["control"].get_xdata()) == [4, 8] and list(lines["control@1"].get_xdata()) == [8]
    assert list(lines["teacher"].get_ydata()) == [2.0, 1.5]  # the sampler row is not in the teacher's curve
