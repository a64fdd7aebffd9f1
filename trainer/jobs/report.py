"""Assemble the pipeline's report from every evaluation.

    python -m trainer.jobs.report --run-dir DIR

Reads ``teacher/eval/metrics.json`` and each ``round_<r>/eval/metrics.json`` and writes
``<run>/report.json`` ({"entropy_rate", "rows": [...]}), ``report.md`` (the table, and per round the
student at its own step count beside the teacher at the same count), and ``quality_vs_steps.png``
(quality and entropy against steps: one curve for the teacher and one per round, like the SDTT
paper's main figure), also logged to TensorBoard.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from trainer.evaluation.sweep import format_table
from trainer.fileio import atomic_write_json, atomic_write_text
from trainer.jobs import common
from trainer.layout import CONTROL, RunLayout
from trainer.runtime.metrics import MetricsWriter

log = logging.getLogger("sdtt")

ROW_KEYS = ("model", "round", "steps", "nll", "nll_se", "nll_gap", "gen_ppl", "entropy", "bigram_kl",
            "samples", "nfe", "seconds")


def collect(run_dir: Path, rounds: int, control: bool = False) -> dict:
    layout = RunLayout(run_dir)
    paths = [layout.eval_metrics(m) for m in [*range(rounds + 1), *([CONTROL] if control else [])]]
    evals = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"missing evaluation {path}: run trainer.jobs.evaluate first")
        evals.append(json.loads(path.read_text()))
    rows = [{k: row.get(k) for k in ROW_KEYS} for ev in evals for row in ev["rows"]]
    return {"entropy_rate": evals[0].get("entropy_rate"), "nll_floor": evals[0].get("nll_floor"),
            "round_steps": {str(ev["round"]): ev["round_steps"] for ev in evals if ev["model"] != "control"},
            "rows": rows, "few_step_gap": few_step_gaps(rows)}


def few_step_gaps(rows: list[dict]) -> list[dict]:
    """Per model: NLL at its fewest evaluated steps minus NLL at its most. SDTT should shrink this gap
    (the cost of sampling in few steps); extra training alone lowers both ends."""
    out = []
    for key in sorted({(r["model"], r["round"]) for r in rows}, key=lambda k: (k[0] != "teacher", k[1], k[0])):
        mine = sorted((r for r in rows if (r["model"], r["round"]) == key and r["nll"] is not None),
                      key=lambda r: r["steps"])
        if len(mine) >= 2:
            out.append({"model": key[0], "round": key[1],
                        "few_steps": mine[0]["steps"], "many_steps": mine[-1]["steps"],
                        "gap": mine[0]["nll"] - mine[-1]["nll"]})
    return out


def head_to_head(report: dict) -> list[dict]:
    """Per round: the student at its own step count beside the teacher at the same count."""
    teacher = {row["steps"]: row for row in report["rows"] if row["model"] == "teacher"}
    control = {row["steps"]: row for row in report["rows"] if row["model"] == "control"}
    out = []
    for row in report["rows"]:
        if row["model"] != "student" or row["steps"] != report["round_steps"][str(row["round"])]:
            continue
        t = teacher.get(row["steps"], {})
        c = control.get(row["steps"], {})
        out.append({"round": row["round"], "steps": row["steps"],
                    "control_nll": c.get("nll"), "control_nll_se": c.get("nll_se"),
                    "student_nll": row["nll"], "student_nll_se": row["nll_se"],
                    "teacher_nll": t.get("nll"), "teacher_nll_se": t.get("nll_se"),
                    "student_entropy": row["entropy"], "teacher_entropy": t.get("entropy"),
                    "student_bigram_kl": row["bigram_kl"], "teacher_bigram_kl": t.get("bigram_kl"),
                    "student_gen_ppl": row["gen_ppl"], "teacher_gen_ppl": t.get("gen_ppl")})
    return out


def plot(report: dict, path: Path):
    """NLL (or gen-PPL) and entropy against steps; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "nll" if any(r["nll"] is not None for r in report["rows"]) else "gen_ppl"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curves: dict[str, list[dict]] = {}
    for row in report["rows"]:
        label = row["model"] if row["model"] != "student" else f"student round {row['round']}"
        curves.setdefault(label, []).append(row)
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        style = dict(marker="o", lw=2.5 if label == "teacher" else 1.5,
                     ls={"teacher": "--", "control": ":"}.get(label, "-"))
        if metric == "nll":
            axes[0].errorbar(steps, [r["nll"] for r in rows], yerr=[2 * (r["nll_se"] or 0) for r in rows],
                             label=label, capsize=2, **style)
        else:
            axes[0].plot(steps, [r["gen_ppl"] for r in rows], label=label, **style)
        axes[1].plot(steps, [r["entropy"] for r in rows], label=label, **style)
    if metric == "nll" and report.get("nll_floor") is not None:
        axes[0].axhline(report["nll_floor"], color="k", lw=0.8, ls=":", label="source entropy")
    axes[0].set_ylabel("exact NLL of samples (nats/token, ±2 SE)" if metric == "nll" else "generative perplexity")
    axes[1].set_ylabel("sample entropy (nats)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


def markdown(report: dict, pairs: list[dict]) -> str:
    lines = ["# SDTT report", ""]
    if report["entropy_rate"] is not None:
        lines += [f"Source entropy rate {report['entropy_rate']:.4f} nats/token; a perfect sampler's samples "
                  f"score {report['nll_floor']:.4f} (the floor).", ""]
    lines += ["## Student at its step count vs the teacher at the same count", "", "```",
              format_table(pairs, ("round", "steps", "teacher_nll", "teacher_nll_se", "student_nll", "student_nll_se",
                                   "control_nll", "control_nll_se", "teacher_entropy", "student_entropy",
                                   "teacher_bigram_kl", "student_bigram_kl",
                                   "teacher_gen_ppl", "student_gen_ppl")), "```", "",
              "## The cost of few steps: NLL at the fewest steps minus NLL at the most", "", "```",
              format_table(report["few_step_gap"], ("model", "round", "few_steps", "many_steps", "gap")), "```", "",
              "## Every evaluation", "", "```", format_table(report["rows"]), "```", "",
              "![quality against steps](quality_vs_steps.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], argv=argv)
    cfg = common.run_config(args)
    report = collect(args.run_dir, cfg.distill.rounds, cfg.distill.control)
    pairs = head_to_head(report)
    report["head_to_head"] = pairs
    fig = plot(report, args.run_dir / "quality_vs_steps.png")
    with MetricsWriter(args.run_dir, enabled=True) as mw:
        mw.figure(cfg.distill.rounds, "report/quality_vs_steps", fig)
    atomic_write_text(args.run_dir / "report.md", markdown(report, pairs))
    atomic_write_json(args.run_dir / "report.json", report)  # last: the stage's product
    print(format_table(report["rows"]))
    print()
    print(format_table(pairs, ("round", "steps", "teacher_nll", "teacher_nll_se", "student_nll", "student_nll_se",
                               "control_nll", "control_nll_se",
                               "teacher_entropy", "student_entropy", "teacher_bigram_kl", "student_bigram_kl")))


if __name__ == "__main__":
    common.entry(main)
