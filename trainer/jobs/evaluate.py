"""Evaluate one model of the pipeline at several step counts.

    python -m trainer.jobs.evaluate --run-dir DIR --round R [key=value ...]

Round 0 is the teacher, round r >= 1 that round's student; ``--control`` evaluates the control after
round r's update count (``control@r``, round r's match; the last round: its whole budget). Every model
is sampled at the step counts of ``eval.steps`` plus every count a round reaches (start, start/2, ...),
with the same seed, so the report can put the student at N steps beside the teacher at N steps, sample
by sample (the samples pair up: trainer/evaluation/paired.py). The temperatures of ``eval.temperatures`` are swept
at the step counts each model is compared at (``sweep_plan``), for the quality-vs-entropy frontier;
the teacher also draws there with each training-free sampler of ``eval.samplers``. Every row stores
its per-sample NLLs and entropies. With ``eval.ideal_rollouts`` > 0 the model also samples the ideal
student of the round it teaches (``ideal`` in metrics.json: trainer/evaluation/ideal.py). Writes
``<model>/eval/metrics.json`` and ``samples.txt``, and the scalars to TensorBoard
(``eval/<model>/nll@<steps>`` at global step = round).
"""
from __future__ import annotations

import dataclasses
import logging
import time

from trainer.config import round_steps
from trainer.data.synthetic import MarkovSource
from trainer.errors import StageError
from trainer.evaluation import metrics
from trainer.evaluation.ideal import ideal_rows
from trainer.evaluation.judges import build_judge
from trainer.evaluation.sweep import PLAIN, eval_counts, evaluate_model, format_table, sweep_plan, taught_round
from trainer.evaluation.text import TextEvaluation
from trainer.fileio import atomic_write_json, atomic_write_text
from trainer.jobs import common
from trainer.layout import AR, EVAL_METRICS, RunLayout
from trainer.runtime.checkpoint import load_model
from trainer.runtime.metrics import MetricsWriter

log = logging.getLogger("sdtt")


def main(argv=None) -> None:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], with_round=True, argv=argv,
                             flags={"--control": "evaluate the control (trainer.jobs.pretrain --control)"})
    cfg = common.run_config(args)
    layout = RunLayout(args.run_dir)
    if cfg.eval.judge == "ar" and not cfg.eval.ar_path:  # the run's own AR stage (pretrain --ar)
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, ar_path=str(layout.export(AR))))
    r = args.round
    device = common.device()
    if args.control and not 1 <= r <= cfg.distill.rounds:
        raise StageError(f"--control --round {r}: the control is exported after rounds 1..{cfg.distill.rounds}")
    # The control after round r's update count (control@r), the match of round r's student.
    export = layout.control_export(r, cfg.distill.rounds) if args.control else layout.export(r)
    model, _ = load_model(export, cfg.eval.weights, cfg.model)
    model.to(device)
    source = MarkovSource(cfg.data.synthetic) if cfg.data.source == "synthetic" else None
    # Text: decode, retokenise for the judge, MAUVE, the likelihood bound (trainer/evaluation/text.py).
    text = None if source else TextEvaluation.build(cfg, args.run_dir, device)
    judge = None if text else build_judge(cfg, device)
    name = "control" if args.control else "teacher" if r == 0 else "student"
    t0 = time.time()
    # The teacher's training-free samplers (eval.samplers), at the counts and temperatures it is swept at.
    samplers = cfg.eval.samplers if r == 0 and not args.control else []
    # control@r before the last round is compared with round r's student only: its count alone.
    rows = evaluate_model(model, cfg, eval_counts(cfg, r, args.control), source, judge, device, progress=True,
                          keep_samples=True, sweep=sweep_plan(cfg, r, args.control), samplers=samplers)
    text_result = text.measure(model, rows) if text else {}
    taught = taught_round(cfg, r, args.control)
    ideal = ideal_rows(model, cfg, taught, source, judge, device, progress=True) if taught is not None else None
    if text and r == 0 and not args.control:  # held-out text, scored once: the report reads the teacher's
        text_result["reference"] = text.reference()
    samples_txt = []
    for row in rows:
        x = row.pop("_samples")
        samples_txt.append(f"# {name} round {r}, {row['steps']} steps, temperature {row['temperature']:g}, "
                           f"sampler {row['sampler']}")
        samples_txt += text.sample_lines(x[:8]) if text else [" ".join(map(str, seq.tolist())) for seq in x[:8]]
        row.update(model=name, round=r)
    out = layout.control_eval(r, cfg.distill.rounds) if args.control else layout.eval(r)
    result = {
        "model": name, "round": r, "weights": cfg.eval.weights,
        "round_steps": round_steps(cfg, r),
        "entropy_rate": source.entropy_rate if source else None,
        "nll_floor": source.sequence_entropy_per_token(cfg.data.seq_len) if source else None,
        "rows": rows, "seconds": round(time.time() - t0, 1), **text_result,
    }
    if ideal is not None:
        result["ideal"] = ideal
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "samples.txt", "\n".join(samples_txt) + "\n")
    with MetricsWriter(args.run_dir, enabled=True) as mw:
        for row in rows:
            if row["temperature"] != 1.0 or row["sampler"] != PLAIN:
                continue
            mw.scalars(r, metrics.tensorboard_scalars(name, row))
        mw.text(r, f"eval/{name}/samples", "\n\n".join(samples_txt[:3]))
    atomic_write_json(out / EVAL_METRICS, result)  # last: its presence means the stage is done
    print(format_table(rows + [dict(row, model="ideal", round=taught) for row in (ideal or {}).get("rows", [])]))
    log.info("wrote %s", out / EVAL_METRICS)


if __name__ == "__main__":
    common.entry(main)
