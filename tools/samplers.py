"""The teacher's training-free samplers at one step count, before any student exists.

    python tools/samplers.py --run-dir DIR --steps 8

Reads ``<run>/teacher/eval/metrics.json`` (trainer.jobs.evaluate --round 0 with ``eval.samplers``) and
the run's config, draws the true-source reference row (the data's entropy; synthetic sources), and
prints per sampler its NLL at temperature 1 and at the data's entropy, and the best sampler − plain at
the data's entropy with its paired SE (trainer/evaluation/compare.py ``compare_samplers``: the same
numbers the report gives beside each student).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.errors import BadInput  # noqa: E402
from trainer.evaluation import compare, report  # noqa: E402
from trainer.layout import RunLayout  # noqa: E402


def sampler_table(rows: list[dict], steps: int, target_entropy: float | None) -> str:
    """Markdown: the teacher's samplers at ``steps`` (``compare_samplers`` without a student)."""
    c = compare.compare_samplers([{**r, "model": "teacher", "round": 0} for r in rows], 1, steps, target_entropy)
    if c is None:
        raise BadInput(f"no eval.samplers rows at {steps} steps: evaluate the teacher with eval.samplers")
    lines = [f"| sampler | NLL at T = 1 | entropy at T = 1 | NLL at data entropy {target_entropy:.4f} |",
             "|---|---|---|---|"]
    for name, v in c["samplers"].items():
        lines.append(f"| {name} | {report.pm(v['nll'])} | {report._num(v['entropy'])} | {report.pm(v['nll_at_H'])} |")
    lines += ["", f"Best at T = 1: `{c['best']}`; best at the data's entropy: `{c['best_at_H']}`, "
              f"best − plain there: {report.pm(c['best_minus_plain_at_H'])} (paired; chosen on these samples)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/samplers.py", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    args = p.parse_args(argv)
    layout = RunLayout(args.run_dir)
    path = layout.eval_metrics(0)
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run trainer.jobs.evaluate --round 0 first")
    cfg = load_config(layout.config)
    ref = report.reference(cfg, args.run_dir)
    if ref is None:
        raise SystemExit("tools/samplers.py needs a synthetic source (the data's entropy comes from it)")
    try:
        print(sampler_table(json.loads(path.read_text())["rows"], args.steps, ref["entropy"]))
    except BadInput as e:
        raise SystemExit(f"{path}: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
