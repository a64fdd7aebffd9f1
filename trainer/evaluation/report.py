"""The pipeline's report: every evaluation's rows, the true-source reference row, per round the paired
comparisons of trainer/evaluation/compare.py, the frontiers (NLL against entropy along each temperature
sweep), the plots and the markdown. Assembled by trainer.jobs.report.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from trainer.evaluation import compare, paired
from trainer.evaluation.sweep import format_table
from trainer.fileio import atomic_write_bytes
from trainer.layout import CONTROL, RunLayout

ROW_KEYS = ("model", "round", "steps", "temperature", "nll", "nll_se", "nll_gap", "gen_ppl", "gen_nll", "entropy",
            "entropy_se", "bigram_kl", "mauve", "samples", "nfe", "seconds")
EXACT = "exact NLL of samples under the source (nats/token)"
JUDGED = "judge NLL of samples (nats per judge token, = log gen-PPL)"


def load_evals(run_dir: Path, rounds: int, control: bool = False) -> list[dict]:
    """Every evaluation's metrics.json (teacher, each round's student, the control when trained)."""
    layout = RunLayout(run_dir)
    paths = [layout.eval_metrics(m) for m in [*range(rounds + 1), *([CONTROL] if control else [])]]
    evals = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"missing evaluation {path}: run trainer.jobs.evaluate first")
        evals.append(json.loads(path.read_text()))
    return evals


def reference(cfg, run_dir: Path) -> dict | None:
    """The reference row: true source samples (synthetic data), or None for text."""
    if cfg.data.source != "synthetic" or cfg.eval.reference_samples == 0:
        return None
    from trainer.data.prepared import MarkovSource
    from trainer.evaluation.sweep import reference_row

    return reference_row(MarkovSource(cfg.data.synthetic), cfg.eval.reference_samples, cfg.data.seq_len,
                         cfg.eval.seed, cfg.eval.num_samples)


def collect(run_dir: Path, rounds: int, control: bool = False, ref: dict | None = None) -> dict:
    """The report: every row (without per-sample values), the reference row, and per round the paired
    comparisons of trainer/evaluation/compare.py at the data's entropy (the reference's)."""
    evals = load_evals(run_dir, rounds, control)
    full = [{**row, "model": ev["model"], "round": ev["round"]} for ev in evals for row in ev["rows"]]
    rows = [{k: row.get(k) for k in ROW_KEYS} for row in full]
    round_steps = {int(ev["round"]): ev["round_steps"] for ev in evals if ev["model"] != "control"}
    control_round = next((int(ev["round"]) for ev in evals if ev["model"] == "control"), None)
    ref = ref or evals[0].get("reference")  # text: held-out rows, measured by the teacher's evaluation
    target = ref["entropy"] if ref else None
    comparisons = compare.compare_all(full, round_steps, target, control_round)
    return {"entropy_rate": evals[0].get("entropy_rate"), "nll_floor": evals[0].get("nll_floor"),
            "data_entropy": target, "reference": ref,
            "measure": EXACT if any(r.get("nll_per_sample") is not None for r in full) else JUDGED,
            "round_steps": {str(k): v for k, v in round_steps.items()}, "control_round": control_round,
            "rows": rows, "comparisons": comparisons, "summary": compare.summary(comparisons),
            "frontiers": frontiers(full)}


def frontiers(full_rows: list[dict]) -> list[dict]:
    """Per (model, round, steps) with a temperature sweep: its points (temperature, entropy, NLL) by
    entropy; NLL as ``paired.sample_nll`` (exact, or the judge's for text)."""
    groups: dict[tuple, list[dict]] = {}
    for row in full_rows:
        if paired.has_sample_nll(row):
            groups.setdefault((row["model"], row["round"], row["steps"]), []).append(row)
    out = []
    for (model, rnd, steps), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda r: r["entropy"])
        ests = [paired.sample_nll(r) for r in rows]
        out.append({"model": model, "round": rnd, "steps": steps,
                    "points": [{"temperature": r["temperature"], "entropy": r["entropy"], "nll": e.value,
                                "nll_se": e.se, "bigram_kl": r.get("bigram_kl"), "mauve": r.get("mauve")}
                               for r, e in zip(rows, ests)]})
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
        if (row.get("temperature") or 1.0) != 1.0:
            continue
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
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    atomic_write_bytes(path, buf.getvalue())  # never half a picture, even on a full disk
    return fig


def plot_frontiers(report: dict, path: Path):
    """Per round, NLL against entropy along each model's temperature sweep at the round's step count:
    the teacher and the control at N and the teacher at 2N beside the student; the data's entropy
    and the NLL floor as lines. Returns the figure (None when nothing was swept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = report["comparisons"]
    if not comps or not report["frontiers"]:
        return None
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 3.8), squeeze=False)
    fr = {(f["model"], f["round"], f["steps"]): f["points"] for f in report["frontiers"]}
    for ax, c in zip(axes[0], comps):
        n, r = c["steps"], c["round"]
        for label, key, style in ((f"teacher {n}", ("teacher", 0, n), "k--"),
                                  (f"teacher {2 * n}", ("teacher", 0, 2 * n), "k:"),
                                  (f"control {n}", ("control", report["control_round"], n), "C1-."),
                                  (f"student r{r} {n}", ("student", r, n), "C0-")):
            pts = fr.get(key)
            if pts:
                ax.errorbar([p["entropy"] for p in pts], [p["nll"] for p in pts],
                            yerr=[2 * (p["nll_se"] or 0) for p in pts], fmt=style, marker="o", ms=3, capsize=2,
                            label=label)
        if report.get("data_entropy") is not None:
            ax.axvline(report["data_entropy"], color="g", lw=0.8, label="data entropy")
        if report.get("nll_floor") is not None:
            ax.axhline(report["nll_floor"], color="g", lw=0.8, ls=":", label="NLL floor")
        ax.set_title(f"round {r}: {n} steps")
        ax.set_xlabel("sample entropy (nats)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(("exact NLL" if report.get("measure", EXACT) == EXACT else "judge NLL (log gen-PPL)")
                          + " of samples (±2 SE)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    atomic_write_bytes(path, buf.getvalue())  # never half a picture, even on a full disk
    return fig


def pm(v: dict | None, digits: int = 3, pct: bool = False) -> str:
    """'value ± SE' of an estimate dict ('-' when absent; '*' marks an extrapolated frontier read)."""
    if not v or v.get("value") is None:
        return "-"
    f = 100.0 if pct else 1.0
    se = f"{f * v['se']:.{digits}f}" if v.get("se") is not None else "?"
    out = f"{f * v['value']:.{digits}f} ± {se}" + ("%" if pct else "")
    return out + ("*" if v.get("extrapolated") else "")


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    lines = ["# SDTT report", ""]
    if report["entropy_rate"] is not None:
        lines += [f"Source entropy rate {report['entropy_rate']:.4f} nats/token; a perfect sampler's samples "
                  f"score {report['nll_floor']:.4f} (the floor).", ""]
    ref = report.get("reference")
    judged = report.get("measure") == JUDGED
    if ref and not judged and ref.get("nll") is not None:
        lines += ["Reference row, true source samples: "
                  f"NLL {ref['nll']:.4f} ± {ref['nll_se']:.4f} ({ref['samples']} samples), "
                  f"sample entropy **{ref['entropy']:.4f}** (the data's entropy, the target of the "
                  f"matched-diversity reads below), bigram KL {_num(ref.get('bigram_kl'), 4)} "
                  "(its floor at the evaluation's sample count).", ""]
    elif ref:
        scored = (f"judge NLL {ref['gen_nll']:.4f} (gen-PPL {ref['gen_ppl']:.1f}), " if ref.get("gen_nll") is not None
                  else "")
        lines += [f"Reference row, {ref['samples']} held-out text rows: {scored}sample entropy "
                  f"**{ref['entropy']:.4f}** (the data's entropy, the target of the matched-diversity reads below).",
                  ""]
    comps = report["comparisons"]
    ctrl = report.get("control_round") is not None
    if not any(c["teacher_nll"] is not None for c in comps):
        # Text without a judge: nothing scores the samples (the text section still gives entropy and the bound).
        lines += ["No likelihood for these samples (a text run without eval.judge): see the text section below."]
        return "\n".join(lines + _closing(report, ctrl))
    lines += ["All differences are paired (sample i of every model shares its noise) and given as "
              "value ± SE over the evaluation samples; the SE covers sampling only, not training seeds.", "",
              "## Per round: the student at its step count N, the teacher and the fair control at N", "",
              "| round | N | teacher | control | student | student − teacher | student − control "
              "| control − teacher | student(N) − teacher(2N) | gap closed: student | gap closed: control |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['round']} | {c['steps']} | {pm(c['teacher_nll'])} | {pm(c['control_nll'])} | "
                     f"{pm(c['student_nll'])} | {pm(c['student_minus_teacher'])} | {pm(c['student_minus_control'])} "
                     f"| {pm(c['control_minus_teacher'])} | {pm(c['student_minus_teacher_2n'])} | "
                     f"{pm(c['gap_closed_student'], 1, pct=True)} | {pm(c['gap_closed_control'], 1, pct=True)} |")
    most = comps[0]["teacher_most_steps"] if comps else None
    unit = ("NLL: the judge's NLL of the samples in nats per judge token, i.e. log gen-PPL (gen-PPL = exp of it)"
            if judged else "NLL in nats/token")
    lines += ["", f"{unit} (negative differences: the first model is better). Gap closed = "
              f"(T_N − X_N) / (T_N − T_{most}): the share of the teacher's cost of sampling in N instead of "
              f"{most} steps that model X removes at N steps (0% = the teacher's, 100% = the teacher at {most}; "
              "'-' where the teacher's own gap is within 2 SE of 0).",
              ""]
    if report.get("data_entropy") is not None:
        lines += [f"## Quality at matched diversity: NLL at the data's entropy ({report['data_entropy']:.4f})", "",
                  "Read off each model's temperature sweep at N (linear interpolation between the two "
                  "temperatures that bracket the data's entropy; * = extrapolated beyond the sweep).", "",
                  "| round | N | teacher | control | student | student − teacher | student − control "
                  "| control − teacher |", "|---|---|---|---|---|---|---|---|"]
        for c in comps:
            lines.append(f"| {c['round']} | {c['steps']} | {pm(c['teacher_nll_at_H'])} | {pm(c['control_nll_at_H'])} "
                         f"| {pm(c['student_nll_at_H'])} | {pm(c['student_minus_teacher_at_H'])} | "
                         f"{pm(c['student_minus_control_at_H'])} | {pm(c['control_minus_teacher_at_H'])} |")
        lines += ["", "![quality against entropy](frontier.png)", ""]
    lines += ["## Diversity at temperature 1 (entropy; bigram KL, higher = less diverse)", "",
              "| round | N | teacher H | control H | student H | teacher bigram KL | control bigram KL "
              "| student bigram KL |", "|---|---|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['round']} | {c['steps']} | {_num(c['teacher_entropy'])} | {_num(c['control_entropy'])} "
                     f"| {_num(c['student_entropy'])} | {_num(c['teacher_bigram_kl'])} | "
                     f"{_num(c['control_bigram_kl'])} | {_num(c['student_bigram_kl'])} |")
    return "\n".join(lines + _closing(report, ctrl))


def _closing(report: dict, ctrl: bool) -> list[str]:
    lines = [] if ctrl else ["", "No control was trained (distill.control=false): the student's gain over the "
                             "teacher cannot be told apart from the effect of training longer."]
    return lines + ["", "## Every evaluation", "", "```", format_table(report["rows"]), "```", "",
                    "![quality against steps](quality_vs_steps.png)", ""]
