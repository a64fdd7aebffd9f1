"""SDTT against its own ceiling, over source chains and training seeds: one table per round.

    python tools/ceiling.py --run-dir runs/p19
    python tools/ceiling.py --run-dir runs/p19 --budget

reads ``<run-dir>/chain-<C>/trained/seed-<s>/`` (a `tools/seeds.py` run of a trained teacher: the
teacher, the control matched per round, the students, the teacher's training-free samplers) and
``<run-dir>/chain-<C>/exact/seed-<s>/`` (the same seed from the exact teacher, ``teacher.source=oracle``
with ``eval.ideal_rollouts``: the exact teacher, its ideal round-1 student and a student distilled from
it). Per round r at its step count N, at temperature 1 and at the data's entropy, every model's NLL
and the differences that answer the issue's questions, each as a mean and a 95% t-interval over the
seeds of each chain and over all (chain, seed) runs (an interval over two chains understates the
chain's share: read the per-chain rows too). Writes ``ceiling.json`` and ``ceiling.md`` there.

``--budget`` writes the budget curve instead (``budget.json``, ``budget.md``): the round-1 student's gain
over its teacher at each ``distill.steps_per_round`` B, from ``<run-dir>/budget-<B>/chain-<C>/{exact,
trained}/seed-<s>/`` (one-round runs) and, for the config's own budget, the runs above, restricted to
the (chain, seed) pairs the other budgets have, so every budget's row covers the same runs; each
budget's change from the first one is paired per run.

The exact teacher and the trained one of a seed share the evaluation seed, so their samples are
paired; their difference is the mean of per-sample differences either way (a valid SE if not).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from trainer.config import PLAIN_SAMPLER, load_config  # noqa: E402
from trainer.evaluation.paired import t_interval  # noqa: E402
from trainer.layout import RunLayout  # noqa: E402

# (key, label) of each line of a round's table, in order; "_at_H" variants are read beside each.
MEASURES = (("trained_teacher", "trained teacher"), ("exact_teacher", "exact teacher"),
            ("control", "control matched to the round"), ("student", "student (from the trained teacher)"),
            ("best_sampler", "best training-free sampler of the trained teacher"),
            ("ideal", "ideal student of the exact teacher"), ("exact_student", "student from the exact teacher"),
            ("student_minus_control", "student − control"), ("student_minus_teacher", "student − trained teacher"),
            ("student_minus_best", "student − best training-free sampler"),
            ("trained_minus_exact_teacher", "trained teacher − exact teacher"),
            ("ideal_gain", "ideal gain over the exact teacher"),
            ("exact_achieved_gain", "gain of the student from the exact teacher"),
            ("exact_achieved_over_ideal", "achieved / ideal (from the exact teacher)"))


def _teacher_row(rows: list[dict], steps: int) -> dict | None:
    """The teacher's plain sampler at ``steps`` and temperature 1."""
    return next((r for r in rows if r["model"] == "teacher" and int(r["round"]) == 0 and r["steps"] == steps
                 and abs(r["temperature"] - 1.0) < 1e-9 and r.get("sampler") == PLAIN_SAMPLER), None)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def seed_record(trained: Path, exact: Path | None) -> dict[str, dict[str, float | None]]:
    """Per round ("r1", ...): every measure of MEASURES (and its ``_at_H``) for one (chain, seed)."""
    rep = json.loads((trained / "report.json").read_text())
    s = rep["summary"]
    xrep = json.loads((exact / "report.json").read_text()) if exact and (exact / "report.json").exists() else None
    xs = xrep["summary"] if xrep else {}
    # The per-sample rows of both teachers' evaluations (report.json keeps no per-sample values).
    t_rows = json.loads(RunLayout(trained).eval_metrics(0).read_text())["rows"] if xrep else []
    x_rows = json.loads(RunLayout(exact).eval_metrics(0).read_text())["rows"] if xrep else []
    out = {}
    for rnd, steps in sorted(rep["round_steps"].items(), key=lambda kv: int(kv[0])):
        if int(rnd) < 1:
            continue
        p, rec = f"r{rnd}", {}
        for h in ("", "_at_H"):
            rec[f"trained_teacher{h}"] = s.get(f"{p}/teacher_nll{h}")
            rec[f"control{h}"] = s.get(f"{p}/control_nll{h}")
            rec[f"student{h}"] = s.get(f"{p}/student_nll{h}")
            rec[f"student_minus_control{h}"] = s.get(f"{p}/student_minus_control{h}")
            rec[f"student_minus_teacher{h}"] = s.get(f"{p}/student_minus_teacher{h}")
            rec[f"student_minus_best{h}"] = s.get(f"{p}/student_minus_best{h}")
            rec[f"best_sampler{h}"] = _minus(rec[f"student{h}"], rec[f"student_minus_best{h}"])
            # The exact run distils one round (16 -> 8 steps); its round 1 is the trained run's round 1.
            same = xrep is not None and xrep["round_steps"].get(rnd) == steps
            rec[f"ideal{h}"] = xs.get(f"{p}/ideal_nll{h}") if same else None
            rec[f"exact_student{h}"] = xs.get(f"{p}/student_nll{h}") if same else None
            rec[f"ideal_gain{h}"] = xs.get(f"{p}/ideal_gain{h}") if same else None
            rec[f"exact_achieved_gain{h}"] = (_minus(xs.get(f"{p}/teacher_nll{h}"), xs.get(f"{p}/student_nll{h}"))
                                              if same else None)
            rec[f"exact_achieved_over_ideal{h}"] = xs.get(f"{p}/achieved_over_ideal{h}") if same else None
            rec[f"exact_teacher{h}"] = xs.get(f"{p}/teacher_nll{h}") if same else None
        t_row, x_row = _teacher_row(t_rows, steps), _teacher_row(x_rows, steps)
        if t_row is not None and x_row is not None:  # every round: the exact teacher sampled at every count
            rec["exact_teacher"] = float(np.mean(x_row["nll_per_sample"]))
            d = np.asarray(t_row["nll_per_sample"], np.float64) - np.asarray(x_row["nll_per_sample"], np.float64)
            rec["trained_minus_exact_teacher"] = float(d.mean())
            rec["trained_minus_exact_teacher_se"] = float(d.std(ddof=1) / np.sqrt(d.size))
        rec["trained_minus_exact_teacher_at_H"] = _minus(rec["trained_teacher_at_H"], rec["exact_teacher_at_H"])
        out[p] = rec
    return out


def collect(run_dir: Path) -> dict[str, dict[int, dict]]:
    """{chain: {seed: seed_record}} for every trained seed with a report."""
    chains: dict[str, dict[int, dict]] = {}
    for trained in sorted(run_dir.glob("chain-*/trained/seed-*")):
        if not (trained / "report.json").exists():
            continue
        chain, seed = trained.parts[-3].split("-", 1)[1], int(trained.name.split("-", 1)[1])
        exact = trained.parents[1] / "exact" / trained.name
        chains.setdefault(chain, {})[seed] = seed_record(trained, exact if exact.is_dir() else None)
    return chains


def aggregate(chains: dict[str, dict[int, dict]]) -> dict:
    """Per round and measure: a t-interval per chain and over every (chain, seed) run."""
    out: dict = {}
    runs = [(c, s, rec) for c, seeds in chains.items() for s, rec in seeds.items()]
    rounds = sorted({r for _, _, rec in runs for r in rec}, key=lambda r: int(r[1:]))
    for r in rounds:
        keys = [f"{k}{h}" for k, _ in MEASURES for h in ("", "_at_H")]
        out[r] = {k: {"all": t_interval([rec[r].get(k) for _, _, rec in runs if r in rec]),
                      **{c: t_interval([rec[r].get(k) for rec in seeds.values() if r in rec])
                         for c, seeds in chains.items()}}
                  for k in keys}
    return out


def _cell(a: dict, pct: bool) -> str:
    if not a or a["n"] == 0:
        return "-"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    ci = f" [{f(a['lo'])}, {f(a['hi'])}]" if a["lo"] is not None else ""
    return f"{f(a['mean'])}{ci} (n={a['n']})"


def start_gap_fit(chains: dict[str, dict[int, dict]]) -> dict | None:
    """Round 1 from the exact teacher, per run: the gap its student starts from (the trained teacher,
    whose weights it starts from, minus the exact teacher, at N) against the gain it achieves over the
    exact teacher; their least-squares line and correlation, and the share of the way from its start
    to the ideal that the student covers. An analysis chosen after looking at the runs, not part of
    their fixed protocol: the markdown says so."""
    runs = [(c, s, rec["r1"]) for c, seeds in chains.items() for s, rec in sorted(seeds.items())
            if "r1" in rec and all(rec["r1"].get(k) is not None for k in
                                   ("trained_minus_exact_teacher", "exact_achieved_gain", "ideal", "exact_student"))]
    if len(runs) < 3:
        return None
    gap = np.array([r["trained_minus_exact_teacher"] for _, _, r in runs])
    gain = np.array([r["exact_achieved_gain"] for _, _, r in runs])
    if np.ptp(gap) == 0 or np.ptp(gain) == 0:  # no line through constant values
        return None
    covered = [(r["trained_teacher"] - r["exact_student"]) / (r["trained_teacher"] - r["ideal"]) for _, _, r in runs]
    slope, intercept = np.polyfit(gap, gain, 1)
    ideal = float(np.mean([r["ideal_gain"] for _, _, r in runs]))
    return {"runs": [{"chain": c, "seed": s, "start_gap": float(g), "gain": float(a), "covered": float(v)}
                     for (c, s, _), g, a, v in zip(runs, gap, gain, covered)],
            "slope": float(slope), "intercept": float(intercept), "r": float(np.corrcoef(gap, gain)[0, 1]),
            "mean_ideal_gain": ideal, "intercept_over_ideal": float(intercept) / ideal,
            "covered": t_interval(covered)}


def _fit_markdown(fit: dict) -> list[str]:
    lines = ["## Where the student from the exact teacher starts (an analysis chosen after looking)", "",
             "Round 1 at N, temperature 1, per run: the start gap (the trained teacher whose weights the student "
             "starts from, minus the exact teacher), the gain achieved over the exact teacher, and the share of "
             "the way from its start to the ideal student that it covers.", "",
             "| chain | seed | start gap | achieved gain | covered |", "|---|---|---|---|---|"]
    lines += [f"| {r['chain']} | {r['seed']} | {r['start_gap']:.3f} | {r['gain']:.3f} | {100 * r['covered']:.0f}% |"
              for r in fit["runs"]]
    cov = fit["covered"]
    lines += ["", f"Least squares: gain = {fit['intercept']:.3f} {fit['slope']:+.3f} x start gap (r = {fit['r']:.2f}); "
              f"at a start gap of 0 that is {100 * fit['intercept_over_ideal']:.0f}% of the mean ideal gain "
              f"({fit['mean_ideal_gain']:.3f}). Covered: {_cell(cov, True)}.", ""]
    return lines


def markdown(agg: dict, chains: dict[str, dict[int, dict]], steps: dict[str, int]) -> str:
    names = sorted(chains)
    lines = ["# SDTT against its ceiling", "",
             "Chains and seeds: " + "; ".join(f"chain {c}: seeds {', '.join(map(str, sorted(chains[c])))}"
                                              for c in names) + ".",
             "NLL of samples under the source (nats/token); mean [95% t-interval over seeds] (n runs). "
             "Differences: negative means the first model is better.", ""]
    for r, per in agg.items():
        lines += [f"## Round {r[1:]} (N = {steps.get(r[1:], '?')} steps)", "",
                  "| measure | " + " | ".join(f"chain {c}, T = 1 | chain {c}, data entropy" for c in names)
                  + " | all, T = 1 | all, data entropy |",
                  "|---|" + "---|---|" * (len(names) + 1)]
        for key, label in MEASURES:
            pct = key.endswith("over_ideal")
            cells = [_cell(per[f"{key}{h}"].get(c), pct) for c in [*names, "all"] for h in ("", "_at_H")]
            if all(c == "-" for c in cells):
                continue
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    fit = start_gap_fit(chains)
    if fit is not None:
        lines += _fit_markdown(fit)
    return "\n".join(lines)


# The budget curve: the round-1 student at its N against its own teacher, per budget.
BUDGET_MEASURES = (("exact_gain", "gain over the exact teacher"),
                   ("exact_achieved_over_ideal", "achieved / ideal (exact teacher)"),
                   ("trained_gain", "gain over the trained teacher"))


def budget_record(exact: Path | None, trained: Path | None) -> dict[str, float | None]:
    """One (chain, seed) run's round-1 measures of BUDGET_MEASURES (and their ``_at_H``)."""
    def summary(run: Path | None) -> dict:
        done = run is not None and (run / "report.json").exists()
        return json.loads((run / "report.json").read_text())["summary"] if done else {}

    xs, ts = summary(exact), summary(trained)
    rec: dict[str, float | None] = {}
    for h in ("", "_at_H"):
        rec[f"exact_gain{h}"] = _minus(xs.get(f"r1/teacher_nll{h}"), xs.get(f"r1/student_nll{h}"))
        rec[f"exact_achieved_over_ideal{h}"] = xs.get(f"r1/achieved_over_ideal{h}")
        gap = ts.get(f"r1/student_minus_teacher{h}")
        rec[f"trained_gain{h}"] = None if gap is None else -gap
    return rec


def collect_budget(run_dir: Path, own_budget: int) -> dict[int, dict[str, dict[int, dict]]]:
    """{budget: {chain: {seed: budget_record}}}; ``own_budget``'s runs are the ceiling runs' round 1."""
    out: dict[int, dict[str, dict[int, dict]]] = {}
    for folder in run_dir.glob("budget-*"):
        b = int(folder.name.split("-", 1)[1])
        for seed_dir in sorted(folder.glob("chain-*/*/seed-*")):
            if (seed_dir / "report.json").exists():
                chain, seed = seed_dir.parts[-3].split("-", 1)[1], int(seed_dir.name.split("-", 1)[1])
                out.setdefault(b, {}).setdefault(chain, {})[seed] = None
    pairs = {(c, s) for per in out.values() for c, seeds in per.items() for s in seeds}
    out[own_budget] = {c: {s: None for cc, s in pairs if cc == c} for c, _ in pairs}
    for b, per in out.items():
        base = run_dir if b == own_budget else run_dir / f"budget-{b}"
        for c, seeds in per.items():
            for s in seeds:
                arm = base / f"chain-{c}"
                seeds[s] = budget_record(arm / "exact" / f"seed-{s}", arm / "trained" / f"seed-{s}")
    return dict(sorted(out.items()))


def aggregate_budget(curve: dict[int, dict[str, dict[int, dict]]]) -> dict:
    """Per budget and measure: a t-interval per chain and over all runs; and the change from the first
    budget, paired per (chain, seed)."""
    first = next(iter(curve))
    out: dict = {}
    for b, per in curve.items():
        runs = [(c, s, rec) for c, seeds in per.items() for s, rec in seeds.items()]
        out[b] = {}
        for k, _ in BUDGET_MEASURES:
            for h in ("", "_at_H"):
                key = f"{k}{h}"
                change = [_minus(rec.get(key), curve[first].get(c, {}).get(s, {}).get(key)) for c, s, rec in runs]
                out[b][key] = {"all": t_interval([rec.get(key) for _, _, rec in runs]),
                               "change": t_interval(change),
                               **{c: t_interval([rec.get(key) for rec in seeds.values()]) for c, seeds in per.items()}}
    return out


def budget_markdown(agg: dict, curve: dict) -> str:
    chains = sorted({c for per in curve.values() for c in per})
    first = next(iter(agg))
    lines = ["# The budget curve: the round-1 student against its teacher, per distill.steps_per_round", "",
             "Runs per budget: " + "; ".join(
                 f"{b}: " + ", ".join(f"chain {c} seeds {sorted(per[c])}" for c in sorted(per))
                 for b, per in curve.items()) + ".",
             "Gains in nats/token (positive: the student is better); mean [95% t-interval] (n runs). "
             f"'change' is each run's value minus its own at {first} updates.", ""]
    for h, title in (("", "temperature 1"), ("_at_H", "the data's entropy")):
        lines += [f"## At {title}", "",
                  "| budget | measure | " + " | ".join(f"chain {c}" for c in chains) + " | all | change from "
                  + f"{first} |", "|---|---|" + "---|" * (len(chains) + 2)]
        for b, per in agg.items():
            for k, label in BUDGET_MEASURES:
                a, pct = per[f"{k}{h}"], k.endswith("over_ideal")
                cells = [_cell(a.get(c), pct) for c in chains] + [_cell(a["all"], pct),
                                                                  _cell(a["change"], pct) if b != first else "-"]
                if all(c == "-" for c in cells):
                    continue
                lines.append(f"| {b} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/ceiling.py", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--budget", action="store_true", help="the budget curve (budget-<B>/ folders) instead")
    args = p.parse_args(argv)
    if args.budget:
        return main_budget(args.run_dir)
    chains = collect(args.run_dir)
    if not chains:
        raise SystemExit(f"[ceiling] no chain-*/trained/seed-*/report.json under {args.run_dir}")
    some = next(args.run_dir.glob("chain-*/trained/seed-*/report.json"))
    steps = json.loads(some.read_text())["round_steps"]
    agg = aggregate(chains)
    (args.run_dir / "ceiling.json").write_text(json.dumps({"runs": chains, "aggregate": agg,
                                                           "start_gap_fit": start_gap_fit(chains)}, indent=1))
    text = markdown(agg, chains, steps)
    (args.run_dir / "ceiling.md").write_text(text)
    print(text)
    return 0


def main_budget(run_dir: Path) -> int:
    some = next(run_dir.glob("chain-*/trained/seed-*/config.yaml"), None)
    if some is None or not any(run_dir.glob("budget-*/chain-*/*/seed-*/report.json")):
        raise SystemExit(f"[ceiling] --budget needs chain-*/trained/seed-*/ and budget-*/ runs under {run_dir}")
    curve = collect_budget(run_dir, load_config(some).distill.steps_per_round)
    agg = aggregate_budget(curve)
    (run_dir / "budget.json").write_text(json.dumps({"runs": curve, "aggregate": agg}, indent=1))
    text = budget_markdown(agg, curve)
    (run_dir / "budget.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
