"""Assemble the pipeline's report from every evaluation.

    python -m trainer.jobs.report --run-dir DIR

Reads ``teacher/eval/metrics.json``, each ``round_<r>/eval/metrics.json`` and the control's (after
every round's update count: ``control/round_<r>/eval``, and ``control/eval`` for the last), and
writes ``<run>/report.json`` (rows, the true-source reference row, per round the paired comparisons of
trainer/evaluation/compare.py and those with the teacher's training-free samplers, a flat ``summary``
for tools/seeds.py, and the frontiers), ``report.md`` (per round: the student at its step count N
beside the teacher and control@r at N, paired differences with SE, the share of the teacher's gap
closed, every model's NLL at the data's own entropy read off its temperature sweep, the student
against the best training-free sampler, the leak-free measures and the bigram-KL frontier),
``quality_vs_steps.png`` and ``frontier.png`` (NLL against entropy, and against bigram KL, along each
sweep), also logged to TensorBoard.
"""
from __future__ import annotations

from trainer.evaluation import text_report
from trainer.evaluation.report import collect, markdown, plot, plot_frontiers, reference
from trainer.fileio import atomic_write_json, atomic_write_text
from trainer.jobs import common
from trainer.runtime.metrics import MetricsWriter


def main(argv=None) -> None:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], argv=argv)
    cfg = common.run_config(args)

    # ---- collect the evaluations and plot them -----------------------------------------------------
    report = collect(args.run_dir, cfg.distill.rounds, cfg.distill.control, reference(cfg, args.run_dir))
    fig = plot(report, args.run_dir / "quality_vs_steps.png")
    ffig = plot_frontiers(report, args.run_dir / "frontier.png")
    rounds, control = cfg.distill.rounds, cfg.distill.control

    # ---- log to TensorBoard, then write report.md and report.json ------------------------------------
    with MetricsWriter(args.run_dir, enabled=True) as mw:
        mw.figure(cfg.distill.rounds, "report/quality_vs_steps", fig)
        if ffig is not None:
            mw.figure(cfg.distill.rounds, "report/frontier", ffig)
        mw.hparams(text_report.hparams(cfg), text_report.final_metrics(args.run_dir, rounds, control))
    extra = text_report.markdown_section(args.run_dir, rounds, control)  # text runs: the field's protocol
    text = markdown(report) + ("\n" + extra if extra else "")
    atomic_write_text(args.run_dir / "report.md", text)
    atomic_write_json(args.run_dir / "report.json", report)  # last: the stage's product
    print(text)


if __name__ == "__main__":
    common.entry(main)
