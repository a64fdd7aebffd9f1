"""SDTT against its own ceiling, over source chains and training seeds: one table per round.

    python tools/ceiling.py --run-dir runs/p19

reads ``<run-dir>/chain-<C>/trained/seed-<s>/`` (a `tools/seeds.py` run of a trained teacher: the
teacher, the control matched per round, the students, the teacher's training-free samplers) and
``<run-dir>/chain-<C>/exact/seed-<s>/`` (the same seed from the exact teacher, ``teacher.source=oracle``
with ``eval.ideal_rollouts``: the exact teacher, its ideal round-1 student and a student distilled from
it). Per round r at its step count N, at temperature 1 and at the data's entropy, every model's NLL
and the differences that answer the issue's questions, each as a mean and a 95% t-interval over the
seeds of each chain and over all (chain, seed) runs (an interval over two chains understates the
chain's share: read the per-chain rows too). Writes ``ceiling.json`` and ``ceiling.md`` there.

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

from trainer.config import PLAIN_SAMPLER  # noqa: E402
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/ceiling.py", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    args = p.parse_args(argv)
    chains = collect(args.run_dir)
    if not chains:
        raise SystemExit(f"[ceiling] no chain-*/trained/seed-*/report.json under {args.run_dir}")
    some = next(args.run_dir.glob("chain-*/trained/seed-*/report.json"))
    steps = json.loads(some.read_text())["round_steps"]
    agg = aggregate(chains)
    (args.run_dir / "ceiling.json").write_text(json.dumps({"runs": chains, "aggregate": agg}, indent=1))
    text = markdown(agg, chains, steps)
    (args.run_dir / "ceiling.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
