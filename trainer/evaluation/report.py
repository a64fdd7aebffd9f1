"""The pipeline's report: every evaluation's rows, the true-source reference row, per round the paired
comparisons of trainer/evaluation/compare.py, the frontiers (NLL against entropy along each temperature
sweep), the plots and the markdown. Assembled by trainer.jobs.report.
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from trainer.config import PLAIN_SAMPLER as PLAIN
from trainer.evaluation import compare, metrics, paired
from trainer.evaluation.sweep import format_table
from trainer.fileio import atomic_write_bytes
from trainer.layout import CONTROL, RunLayout

EXACT = "exact NLL of samples under the source (nats/token)"
JUDGED = "judge NLL of samples (nats per judge token, = log gen-PPL)"


def load_evals(run_dir: Path, rounds: int, control: bool = False, *, matched: bool = True,
               missing_ok: bool = False) -> list[dict]:
    """Every evaluation's metrics.json (teacher, each round's student, the control when trained), then
    with ``matched`` the control@r that exist. ``missing_ok``: leave out a model not evaluated (yet)
    instead of failing."""
    layout = RunLayout(run_dir)
    paths = [layout.eval_metrics(m) for m in [*range(rounds + 1), *([CONTROL] if control else [])]]
    evals = []
    for path in paths:
        if not path.exists():
            if missing_ok:
                continue
            raise FileNotFoundError(f"missing evaluation {path}: run trainer.jobs.evaluate first")
        evals.append(json.loads(path.read_text()))
    # control@r (r < rounds): the control after round r's update count. A run from before the control
    # was exported per round has none; its rounds are then compared with the last control (marked).
    for r in range(1, rounds) if control and matched else ():
        path = layout.control_eval_metrics(r, rounds)
        if path.exists():
            evals.append(json.loads(path.read_text()))
    return evals


def reference(cfg, run_dir: Path) -> dict | None:
    """The reference row: true source samples (synthetic data), or None for text."""
    if cfg.data.source != "synthetic" or cfg.eval.reference_samples == 0:
        return None
    from trainer.data.synthetic import MarkovSource
    from trainer.evaluation.sweep import reference_row

    return reference_row(MarkovSource(cfg.data.synthetic), cfg.eval.reference_samples, cfg.data.seq_len,
                         cfg.eval.seed, cfg.eval.num_samples)


def collect(run_dir: Path, rounds: int, control: bool = False, ref: dict | None = None) -> dict:
    """The report: every row (without per-sample values), the reference row, and per round the paired
    comparisons of trainer/evaluation/compare.py at the data's entropy (the reference's)."""
    evals = load_evals(run_dir, rounds, control)
    full = [{**row, "model": ev["model"], "round": ev["round"]} for ev in evals for row in ev["rows"]]
    # The ideal student of round r, sampled by model r - 1's evaluation (trainer/evaluation/ideal.py)
    full += [{**row, "model": "ideal", "round": ev["ideal"]["round"]} for ev in evals if ev.get("ideal")
             for row in ev["ideal"]["rows"]]
    keys = metrics.columns(metrics.ROW)  # what names a row, and every measure report.json keeps
    rows = [{k: row.get(k) for k in keys} for row in full]
    round_steps = {int(ev["round"]): ev["round_steps"] for ev in evals if ev["model"] != "control"}
    control_round = max((int(ev["round"]) for ev in evals if ev["model"] == "control"), default=None)
    ref = ref or evals[0].get("reference")  # text: held-out rows, measured by the teacher's evaluation
    target = ref["entropy"] if ref else None
    comparisons = compare.compare_all(full, round_steps, target, control_round)
    samplers = [c for r, n in sorted(round_steps.items()) if r >= 1
                for c in [compare.compare_samplers(full, r, n, target)] if c is not None]
    return {"entropy_rate": evals[0].get("entropy_rate"), "nll_floor": evals[0].get("nll_floor"),
            "teacher_bound": teacher_bound(run_dir), "data_entropy": target, "reference": ref,
            "measure": EXACT if any(r.get("nll_per_sample") is not None for r in full) else JUDGED,
            "round_steps": {str(k): v for k, v in round_steps.items()}, "control_round": control_round,
            "rows": rows, "comparisons": comparisons, "samplers": samplers,
            "summary": {**compare.summary(comparisons), **compare.sampler_summary(samplers)},
            "frontiers": frontiers(full)}


def teacher_bound(run_dir: Path) -> dict | None:
    """The teacher's last validation NLL bound (``val/nll`` of its pretraining, nats/token) and its
    step, from the run's metrics.jsonl (the last line of the last step wins: a resumed run repeats
    steps); None when absent (an imported teacher)."""
    path = RunLayout(run_dir).metrics(0) / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the others still count
        if isinstance(rec, dict) and rec.get("tag") == "val/nll" and isinstance(rec.get("value"), (int, float)):
            if last is None or rec["step"] >= last["step"]:
                last = {"step": int(rec["step"]), "value": float(rec["value"])}
    return last


def bigram_frontier(report: dict) -> list[dict]:
    """Per round and model (teacher, control, student at the round's N; plain sampler): the point of its
    temperature sweep with the lowest bigram KL (the most source-like transition law; unlike unigram
    entropy it sees transitions, and it is not monotone in temperature, so it is read at its minimum,
    not interpolated), and whether the student's (bigram KL, NLL) sweep Pareto-dominates the teacher's:
    every teacher point has a student point at most as far in both."""
    fr = {(f["model"], f["round"], f["steps"]): f["points"] for f in report.get("frontiers") or []
          if (f.get("sampler") or PLAIN) == PLAIN}
    out = []
    for c in report["comparisons"]:
        n, r = c["steps"], c["round"]
        pts = {"teacher": fr.get(("teacher", 0, n)),
               "control": fr.get(("control", c.get("control_round", report.get("control_round")), n)),
               "student": fr.get(("student", r, n))}
        row: dict = {"round": r, "steps": n}
        for name, p in pts.items():
            p = [q for q in p or [] if q.get("bigram_kl") is not None]
            row[name] = min(p, key=lambda q: q["bigram_kl"]) if p else None
        t, st = [q for q in pts["teacher"] or [] if q.get("bigram_kl") is not None], \
            [q for q in pts["student"] or [] if q.get("bigram_kl") is not None]
        row["student_dominates_teacher"] = (all(any(q["bigram_kl"] <= a["bigram_kl"] and q["nll"] <= a["nll"]
                                                    for q in st) for a in t) if t and st else None)
        out.append(row)
    return out


def frontiers(full_rows: list[dict]) -> list[dict]:
    """Per (model, round, steps) with a temperature sweep: its points (temperature, entropy, NLL) by
    entropy; NLL as ``paired.sample_nll`` (exact, or the judge's for text)."""
    groups: dict[tuple, list[dict]] = {}
    for row in full_rows:
        if paired.has_sample_nll(row):
            groups.setdefault((row["model"], row["round"], row["steps"], row.get("sampler") or PLAIN), []).append(row)
    out = []
    for (model, rnd, steps, sampler), rows in sorted(groups.items(),
                                                     key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2], kv[0][3])):
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda r: r["entropy"])
        ests = [paired.sample_nll(r) for r in rows]
        out.append({"model": model, "round": rnd, "steps": steps, "sampler": sampler,
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
        if (row.get("temperature") or 1.0) != 1.0 or (row.get("sampler") or PLAIN) != PLAIN:
            continue
        label = (f"student round {row['round']}" if row["model"] == "student" else
                 f"control@{row['round']}" if row["model"] == "control" and row["round"] != report["control_round"]
                 else row["model"])
        curves.setdefault(label, []).append(row)
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        style = dict(marker="o", lw=2.5 if label == "teacher" else 1.5,
                     ls={"teacher": "--", "control": ":"}.get(label.split("@")[0], "-"))
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
    and the NLL floor as lines; below, where the source has a bigram law, NLL against bigram KL
    along the same sweeps. Returns the figure (None when nothing was swept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = report["comparisons"]
    if not comps or not report["frontiers"]:
        return None
    # A second row, NLL against bigram KL, where the source has a bigram law (the bigram-KL frontier).
    kl = any(p.get("bigram_kl") is not None for f in report["frontiers"] for p in f["points"])
    fig, axes = plt.subplots(2 if kl else 1, len(comps), figsize=(4.2 * len(comps), 3.8 * (2 if kl else 1)),
                             squeeze=False)
    fr = {(f["model"], f["round"], f["steps"]): f["points"] for f in report["frontiers"]
          if (f.get("sampler") or PLAIN) == PLAIN}
    for i, c in enumerate(comps):
        ax = axes[0][i]
        n, r = c["steps"], c["round"]
        for label, key, style in ((f"teacher {n}", ("teacher", 0, n), "k--"),
                                  (f"teacher {2 * n}", ("teacher", 0, 2 * n), "k:"),
                                  (f"control {n}", ("control", c.get("control_round", report["control_round"]), n),
                                   "C1-."),
                                  (f"student r{r} {n}", ("student", r, n), "C0-"),
                                  (f"ideal r{r} {n}", ("ideal", r, n), "C2-")):
            pts = fr.get(key)
            if pts:
                ax.errorbar([p["entropy"] for p in pts], [p["nll"] for p in pts],
                            yerr=[2 * (p["nll_se"] or 0) for p in pts], fmt=style, marker="o", ms=3, capsize=2,
                            label=label)
                if kl:
                    byk = sorted((p for p in pts if p.get("bigram_kl") is not None), key=lambda p: p["temperature"])
                    axes[1][i].errorbar([p["bigram_kl"] for p in byk], [p["nll"] for p in byk],
                                        yerr=[2 * (p["nll_se"] or 0) for p in byk], fmt=style, marker="o", ms=3,
                                        capsize=2, label=label)
        if kl:
            axes[1][i].set_xlabel("bigram KL to the source (nats; lower = more source-like)")
            axes[1][i].grid(alpha=0.3)
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
    if kl:
        axes[1][0].set_ylabel("exact NLL of samples (±2 SE), by temperature")
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


def _sig(v: dict | None, z: float = 2.0) -> int:
    """-1 / +1 when an estimate is below / above 0 by more than z SE, 0 when it is within (or absent)."""
    if not v or v.get("value") is None or v.get("se") is None:
        return 0
    return -1 if v["value"] < -z * v["se"] else 1 if v["value"] > z * v["se"] else 0


def in_short(comps: Sequence[dict]) -> list[str]:
    """The report's first lines: what this run shows about SDTT, read off the paired comparisons at 2
    SE, so that a reader of an under-trained demo is not left to find out from the tables that the
    fair control, not SDTT, explains the students' gains (or that the students beat it)."""
    comps = [c for c in comps if c.get("student_minus_control") and c.get("control_minus_teacher")]
    if not comps:
        return []
    word = {-1: "better than", 0: "level with (within 2 SE)", 1: "worse than"}
    per_round = "; ".join(f"round {c['round']} (N = {c['steps']}): student {word[_sig(c['student_minus_control'])]} "
                          f"the control, {pm(c['student_minus_control'])}" for c in comps)
    lines = ["## In short", "", f"Student against the fair control at its step count N: {per_round}."]
    if all(_sig(c["control_minus_teacher"]) < 0 for c in comps):
        lines.append("The control (the teacher trained on with its own loss for the students' budget) is better "
                     "than the teacher at every round: the teacher was still learning, so in this run a student's "
                     "gain over the teacher measures more training, not SDTT. SDTT's own effect is measured against "
                     "a converged teacher (configs/tiny-regime.yaml; docs/sdtt-results.md).")
    elif all(_sig(c["student_minus_control"]) < 0 for c in comps):
        lines.append("The student beats the fair control at every round: a gain beyond what training the teacher "
                     "on gives (read it at matched diversity below too).")
    return lines + [""]


def markdown(report: dict) -> str:
    lines = ["# SDTT report", "", *in_short(report["comparisons"])]
    if report["entropy_rate"] is not None:
        lines += [f"Source entropy rate {report['entropy_rate']:.4f} nats/token; a perfect sampler's samples "
                  f"score {report['nll_floor']:.4f} (the floor).", ""]
        tb = report.get("teacher_bound")
        if tb is not None and report.get("nll_floor") is not None:
            lines += [f"The teacher's validation NLL bound (its last `val/nll`, step {tb['step']}): "
                      f"{tb['value']:.4f} nats/token, {tb['value'] - report['nll_floor']:+.4f} from the source's "
                      "floor (a bound: it can only reach the floor from above, up to its own noise).", ""]
    ref = report.get("reference")
    judged = report.get("measure") == JUDGED
    if ref and not judged and ref.get("nll") is not None:
        lines += ["Reference row, true source samples: "
                  f"NLL {ref['nll']:.4f} ± {ref['nll_se']:.4f} ({ref['samples']} samples), "
                  f"sample entropy **{ref['entropy']:.4f}** (the data's entropy, the target of the "
                  f"matched-diversity reads below), bigram KL {_num(ref.get('bigram_kl'), 4)} "
                  "(its floor at the evaluation's sample count).", ""]
    elif ref:
        scored = (f"judge NLL {ref['gen_nll']:.4f} (gen-PPL {ref['gen_ppl']:.1f}, protocol "
                  f"`{ref.get('gen_protocol') or 'first_doc'}`), " if ref.get("gen_nll") is not None else "")
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
              "The control of round r is the control after r x steps_per_round updates (control@r: the round-r "
              "student's update count, learning rates, batch and EMA decay)"
              + ("" if all(c.get("control_matched", True) for c in comps) else
                 "; rounds marked † are compared with the last round's control instead (no control@r was "
                 "evaluated: more updates than the student)") + ".", "",
              "| round | N | teacher | control | student | student − teacher | student − control "
              "| control − teacher | student(N) − teacher(2N) | gap closed: student | gap closed: control |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        dag = "" if c.get("control_matched", True) else " †"
        lines.append(f"| {c['round']}{dag} | {c['steps']} | {pm(c['teacher_nll'])} | {pm(c['control_nll'])} | "
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
    lines += _sampler_section(report)
    if any(c.get("teacher_invalid_rate") for c in comps):
        lines += ["## Free of the leak constant, at temperature 1", "",
                  "The exact NLL prices each transition outside the source's support at log(V / leak) nats, an "
                  "arbitrary constant. Invalid rate: the share of transitions outside the support (± SE); valid "
                  "NLL: −log P per transition inside it (nats, ± SE), nearly free of the leak.", "",
                  "| round | N | teacher invalid | control invalid | student invalid | teacher valid NLL "
                  "| control valid NLL | student valid NLL |", "|---|---|---|---|---|---|---|---|"]
        for c in comps:
            lines.append(f"| {c['round']} | {c['steps']} | {pm(c.get('teacher_invalid_rate'), 4)} | "
                         f"{pm(c.get('control_invalid_rate'), 4)} | {pm(c.get('student_invalid_rate'), 4)} | "
                         f"{pm(c.get('teacher_valid_nll'))} | {pm(c.get('control_valid_nll'))} | "
                         f"{pm(c.get('student_valid_nll'))} |")
        lines.append("")
    bf = bigram_frontier(report)
    if any(b["teacher"] for b in bf):
        def kl_point(q):
            return "-" if not q else f"{q['bigram_kl']:.4f} / {q['nll']:.3f} (T {q['temperature']:g})"

        lines += ["## The bigram-KL frontier (beside the entropy frontier)", "",
                  "Per-sequence unigram entropy barely sees transitions; the bigram KL to the source does. Each "
                  "model's temperature sweep at N, at its lowest bigram KL: KL / NLL (temperature); "
                  "'dominates': every teacher point has a student point with both lower or equal.", "",
                  "| round | N | teacher | control | student | student dominates teacher |",
                  "|---|---|---|---|---|---|"]
        for b in bf:
            dom = "-" if b["student_dominates_teacher"] is None else ("yes" if b["student_dominates_teacher"] else "no")
            lines.append(f"| {b['round']} | {b['steps']} | {kl_point(b['teacher'])} | {kl_point(b['control'])} | "
                         f"{kl_point(b['student'])} | {dom} |")
        lines.append("")
    lines += _ideal_section(report)
    lines += ["## Diversity at temperature 1 (entropy; bigram KL, higher = less diverse)", "",
              "| round | N | teacher H | control H | student H | teacher bigram KL | control bigram KL "
              "| student bigram KL |", "|---|---|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['round']} | {c['steps']} | {_num(c['teacher_entropy'])} | {_num(c['control_entropy'])} "
                     f"| {_num(c['student_entropy'])} | {_num(c['teacher_bigram_kl'])} | "
                     f"{_num(c['control_bigram_kl'])} | {_num(c['student_bigram_kl'])} |")
    return "\n".join(lines + _closing(report, ctrl))


def _sampler_section(report: dict) -> list[str]:
    """The student against its teacher's training-free samplers (``eval.samplers``) at equal steps."""
    comps = report.get("samplers") or []
    if not comps:
        return []
    lines = ["## Against the teacher's training-free samplers at the student's N", "",
             "Each sampler of `eval.samplers` (and `plain`, the teacher's own) drawn by the teacher at N steps over "
             "the same temperatures: its NLL at temperature 1 and at the data's entropy, and student − sampler "
             "(paired over the shared noise; with confidence-ordered unmasking the positions unmasked depend on "
             "the model, so those pairs are looser and their SE larger). Best = the lowest NLL, chosen on these "
             "same samples (a selection that favours the samplers); at the data's entropy only interpolated "
             "reads compete. At temperature 1 the lowest NLL tends to belong to the sharpest sampler (see its "
             "entropy): the read at the data's entropy is the fair one.", ""]
    for c in comps:
        lines += [f"### Round {c['round']}: N = {c['steps']} (best at temperature 1: `{c['best']}`; "
                  f"at the data's entropy: `{c['best_at_H']}`)", "",
                  "| sampler | NLL at T = 1 | entropy at T = 1 | student − sampler | NLL at data entropy "
                  "| student − sampler at data entropy |", "|---|---|---|---|---|---|"]
        for name, v in c["samplers"].items():
            lines.append(f"| {name} | {pm(v['nll'])} | {_num(v['entropy'])} | {pm(v['student_minus'])} | "
                         f"{pm(v['nll_at_H'])} | {pm(v['student_minus_at_H'])} |")
        lines += ["", f"Student − best: {pm(c['student_minus_best'])} at temperature 1, "
                  f"{pm(c['student_minus_best_at_H'])} at the data's entropy; best sampler − plain at the data's "
                  f"entropy: {pm(c['best_minus_plain_at_H'])}.", ""]
    return lines
def _ideal_section(report: dict) -> list[str]:
    """Each round's student against the ideal SDTT student of its teacher (trainer/evaluation/ideal.py);
    nothing when no ideal student was evaluated (eval.ideal_rollouts=0)."""
    comps = [c for c in report["comparisons"] if c.get("ideal_nll")]
    if not comps:
        return []

    def mc(v: dict | None, pct: bool = False) -> str:
        if not v or v.get("mc_se") is None:
            return "MC -"
        return f"MC {100 * v['mc_se']:.1f}%" if pct else f"MC {v['mc_se']:.3f}"

    lines = ["## Against the ceiling: the ideal SDTT student", "",
             "The ideal student of round r samples, at every step, the optimum of the round's divergence over "
             "its teacher's m-step targets (reverse KL: their normalised geometric mean; forward KL: their mean), "
             "estimated from R teacher rollouts: what a perfectly trained round-r student would score. Achieved / "
             "ideal = (teacher − student) / (teacher − ideal), the round's teacher being model r − 1; paired SE, "
             "then the ideal row's Monte Carlo SE (MC; not in the paired SE). '-' where the ideal gain is within "
             "2 SE of 0.", "",
             "| round | N | round's teacher | teacher | ideal (MC) | student | ideal gain | achieved gain "
             "| achieved / ideal (MC) | at the data's entropy: teacher | ideal (MC) | achieved / ideal (MC) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        ratio, ratio_h = c.get("achieved_over_ideal"), c.get("achieved_over_ideal_at_H")
        lines.append(f"| {c['round']} | {c['steps']} | {c['round_teacher']} | {pm(c['round_teacher_nll'])} | "
                     f"{pm(c['ideal_nll'])} ({mc(c['ideal_nll'])}) | {pm(c['student_nll'])} | {pm(c['ideal_gain'])} | "
                     f"{pm(c['achieved_gain'])} | {pm(ratio, 1, pct=True)} ({mc(ratio, True)}) | "
                     f"{pm(c.get('round_teacher_nll_at_H'))} | {pm(c.get('ideal_nll_at_H'))} "
                     f"({mc(c.get('ideal_nll_at_H'))}) | {pm(ratio_h, 1, pct=True)} ({mc(ratio_h, True)}) |")
    return lines + [""]


def _closing(report: dict, ctrl: bool) -> list[str]:
    lines = [] if ctrl else ["", "No control was trained (distill.control=false): the student's gain over the "
                             "teacher cannot be told apart from the effect of training longer."]
    return lines + ["", "## Every evaluation", "", "```", format_table(report["rows"]), "```", "",
                    "![quality against steps](quality_vs_steps.png)", ""]
