"""Run the SDTT pipeline for several training seeds and aggregate the reports.

    python tools/seeds.py --config configs/tiny-regime.yaml --seeds 0 1 2 --run-dir runs/regime [key=value ...]
    python tools/seeds.py --run-dir runs/regime --aggregate-only

Seed s runs ``tools/submit.py --local`` into ``<run-dir>/seed-<s>`` with ``seed=s train.seed=s
data.seed=s eval.seed=E+s`` (E: the config's ``eval.seed``; seed 0 keeps it): weights, training noise,
data order, targets and the evaluation's sampling noise differ; the source chain and everything else
stay. A seed whose ``report.json`` exists is skipped. Then every scalar of each report's ``summary``
(trainer/evaluation/compare.py) is aggregated over the seeds: mean and a 95% Student-t interval, written
to ``<run-dir>/seeds.json`` and ``seeds.md``, where a matched-entropy read that one seed took by
extrapolation beyond its sweep is marked ``*``. A per-seed paired SE measures sampling noise only; the
interval over seeds covers training and evaluation noise, conditional on the one source chain (run
several ``data.synthetic.seed`` values for the chain's share).

An override may name the seed as ``{seed}``: ``teacher.init_from=runs/regime/seed-{seed}/teacher/export``
distils seed s from the exact teacher, starting from the trained teacher of the same seed.
``--teacher-from runs/regime`` starts each new seed from that run's seed of the same number: its
prepared data, teacher and teacher evaluation are adopted (cluster/pipeline.py adopt), so only the
rounds run; the two configs may differ only under ``distill.`` and ``targets.``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cluster.pipeline import STATE_FILE, adopt, build_chain  # noqa: E402
from trainer.config import config_diff, load_config, resolve_paths  # noqa: E402
from trainer.evaluation.paired import t_interval  # noqa: E402

# The measures seeds.md shows per round, in this order (the rest are in seeds.json).
SHOWN = (("student_nll", "student NLL at N"), ("teacher_nll", "teacher NLL at N"),
         ("control_nll", "control NLL at N"),
         ("student_minus_teacher", "student − teacher"), ("student_minus_control", "student − control"),
         ("control_minus_teacher", "control − teacher"), ("student_minus_teacher_2n", "student(N) − teacher(2N)"),
         ("gap_closed_student", "gap closed, student"), ("gap_closed_control", "gap closed, control"),
         ("teacher_nll_at_H", "teacher NLL at data entropy"), ("control_nll_at_H", "control NLL at data entropy"),
         ("student_nll_at_H", "student NLL at data entropy"),
         ("student_minus_teacher_at_H", "student − teacher at data entropy"),
         ("student_minus_control_at_H", "student − control at data entropy"),
         ("control_minus_teacher_at_H", "control − teacher at data entropy"),
         ("teacher_entropy", "teacher entropy"), ("control_entropy", "control entropy"),
         ("student_entropy", "student entropy"),
         ("student_minus_best", "student − best training-free sampler"),
         ("student_minus_best_at_H", "student − best training-free sampler at data entropy"),
         ("best_minus_plain_at_H", "best training-free sampler − plain at data entropy"),
         ("teacher_invalid_rate", "teacher invalid-transition rate"),
         ("control_invalid_rate", "control invalid-transition rate"),
         ("student_invalid_rate", "student invalid-transition rate"),
         ("teacher_valid_nll", "teacher valid-transition NLL"), ("control_valid_nll", "control valid-transition NLL"),
         ("student_valid_nll", "student valid-transition NLL"))


def eval_seed(config: str, overrides: list[str], seed: int) -> int:
    """Training seed ``seed``'s evaluation seed: the config's ``eval.seed`` + seed, so no two training
    seeds share the evaluation's sampling noise (seed 0 keeps the config's)."""
    return load_config(config, overrides).eval.seed + seed


def seed_overrides(overrides: list[str], seed: int) -> list[str]:
    """``overrides`` with ``{seed}`` replaced by the training seed (only that placeholder: a value may
    hold other braces, e.g. a list of samplers)."""
    return [o.replace("{seed}", str(seed)) for o in overrides]


def seed_args(config: str, overrides: list[str], seed: int) -> list[str]:
    """Every override of training seed ``seed``: its seeds, then the shared ``overrides``."""
    overrides = seed_overrides(overrides, seed)
    return [f"seed={seed}", f"train.seed={seed}", f"data.seed={seed}", *overrides,
            f"eval.seed={eval_seed(config, overrides, seed)}"]


# What a run may change and still adopt another run's teacher stages (--teacher-from): how it distils.
ADOPT_MAY_DIFFER = ("distill.", "targets.")


def adopt_teacher(config: str, overrides: list[str], seed: int, src: Path, dst: Path) -> None:
    """Start seed ``seed``'s run ``dst`` from run ``src``'s teacher (cluster/pipeline.py adopt), after
    checking that the two configs differ only in how they distil (ADOPT_MAY_DIFFER)."""
    saved = src / "config.yaml"
    if not saved.exists():
        raise SystemExit(f"[seeds] --teacher-from: {saved} does not exist")
    # As tools/submit.py will write it: paths absolute against the folder submit runs in (ROOT).
    new, _ = resolve_paths(load_config(config, seed_args(config, overrides, seed)), ROOT)
    differ = [k for k in config_diff(load_config(saved), new) if not k.startswith(ADOPT_MAY_DIFFER)]
    if differ:
        raise SystemExit(f"[seeds] --teacher-from: {saved} differs at {', '.join(differ)}; only keys under "
                         f"{', '.join(ADOPT_MAY_DIFFER)} may differ from the run whose teacher is reused")
    names = adopt(src, dst, build_chain(new))
    print(f"[seeds] seed {seed}: adopted {', '.join(names)} from {src}", flush=True)


def run_seed(config: str, run_dir: Path, seed: int, overrides: list[str], nproc: int | None) -> float:
    cmd = [sys.executable, str(ROOT / "tools" / "submit.py"), "--config", config, "--local", "--run-dir",
           str(run_dir), *seed_args(config, overrides, seed)]
    if nproc:
        cmd[4:4] = ["--nproc", str(nproc)]
    t0 = time.time()
    log_path = run_dir.parent / f"{run_dir.name}.log"
    print(f"[seeds] seed {seed}: {' '.join(cmd)} > {log_path}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"[seeds] seed {seed} failed (exit {proc.returncode}); see {log_path}")
    return time.time() - t0


def aggregate(reports: dict[int, dict]) -> dict:
    """Per summary key: the per-seed values and their mean with a 95% t-interval."""
    keys = sorted({k for r in reports.values() for k in r["summary"]})
    out = {}
    for key in keys:
        vals = {s: r["summary"].get(key) for s, r in reports.items()}
        out[key] = {"per_seed": vals, **t_interval([v for v in vals.values() if v is not None])}
    return out


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def markdown(agg: dict, reports: dict[int, dict], meta: dict) -> str:
    seeds = sorted(reports)
    lines = ["# SDTT over training seeds", "",
             f"Config `{meta.get('config')}`, seeds {', '.join(map(str, seeds))}. Mean and 95% Student-t interval "
             "over seeds (training and sampling noise together); differences are per-seed paired means "
             "(negative: the first model has the lower NLL).", ""]
    ref = next(iter(reports.values())).get("reference")
    if ref:
        lines += [f"Data (true source samples): NLL {ref['nll']:.4f}, entropy {ref['entropy']:.4f}, "
                  f"bigram KL floor {ref.get('bigram_kl') or float('nan'):.4f}.", ""]
    rounds = sorted({k.split("/")[0] for k in agg}, key=lambda r: int(r[1:]))
    steps = next(iter(reports.values()))["round_steps"]
    for rnd in rounds:
        lines += [f"## Round {rnd[1:]} (N = {steps.get(rnd[1:], '?')} steps)", "",
                  "| measure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | 95% interval |",
                  "|---|" + "---|" * len(seeds) + "---|---|"]
        for key, label in SHOWN:
            a = agg.get(f"{rnd}/{key}")
            if a is None or a["n"] == 0:
                continue
            pct = key.startswith("gap_closed")
            flags = (agg.get(f"{rnd}/{key}_extrapolated") or {}).get("per_seed", {})
            per = " | ".join(_fmt(a["per_seed"].get(s), pct) + ("*" if flags.get(s) else "") for s in seeds)
            star = "*" if any(flags.get(s) for s in seeds) else ""
            ci = f"[{_fmt(a['lo'], pct)}, {_fmt(a['hi'], pct)}]" if a["lo"] is not None else "-"
            lines.append(f"| {label} | {per} | {_fmt(a['mean'], pct)}{star} | {ci} |")
        lines.append("")
    if any(k.endswith("_extrapolated") and any(v["per_seed"].values()) for k, v in agg.items()):
        lines += ["\\* a read at the data's entropy extrapolated beyond that seed's temperature sweep (a mean "
                  "with one is marked too).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/seeds.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--nproc", type=int, default=None, help="processes per distributed stage (submit.py --nproc)")
    p.add_argument("--aggregate-only", action="store_true", help="aggregate the seed-* folders that have a report")
    p.add_argument("--teacher-from", type=Path, default=None,
                   help="a seeds run folder whose seed-<s> teacher each new seed reuses (only distill.* and "
                        "targets.* may differ): its data, teacher and teacher evaluation, not retrained")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every seed")
    args = p.parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    if not args.aggregate_only:
        if not args.config:
            p.error("--config is required unless --aggregate-only")
        for s in args.seeds:
            d = args.run_dir / f"seed-{s}"
            if (d / "report.json").exists():
                print(f"[seeds] seed {s}: report exists, skipped", flush=True)
                continue
            if args.teacher_from and not (d / STATE_FILE).exists():
                adopt_teacher(args.config, args.overrides, s, args.teacher_from / f"seed-{s}", d)
            timings[s] = round(run_seed(args.config, d, s, args.overrides, args.nproc), 1)
            print(f"[seeds] seed {s}: done in {timings[s]:.0f} s", flush=True)
    reports = {}
    for d in sorted(args.run_dir.glob("seed-*")):
        if (d / "report.json").exists():
            reports[int(d.name.split("-", 1)[1])] = json.loads((d / "report.json").read_text())
    if not reports:
        raise SystemExit(f"[seeds] no seed-*/report.json under {args.run_dir}")
    agg = aggregate(reports)
    config = args.config
    if config is None:  # --aggregate-only: the run's own name (every seed folder holds its config.yaml)
        saved = args.run_dir / f"seed-{min(reports)}" / "config.yaml"
        config = f"{saved} (name: {load_config(saved).name})" if saved.exists() else None
    meta = {"config": config, "seeds": sorted(reports), "overrides": args.overrides, "seconds": timings}
    (args.run_dir / "seeds.json").write_text(json.dumps({"meta": meta, "aggregate": agg}, indent=1))
    text = markdown(agg, reports, meta)
    (args.run_dir / "seeds.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
