"""Every path of a run folder, and the exit codes of the jobs: one place that knows both.

A run folder (``<run>``)::

    config.yaml              the resolved config of the whole pipeline (written by the first stage)
    pipeline_state.json      finished stages and the sha256 of their products (cluster/pipeline.py)
    run.lock.json            who writes the folder now: a process or a SLURM chain (trainer/runlock.py)
    logs/  tb/  metrics.jsonl
    data/                    prepared token data, data.json last (unless data.cache_dir moves it)
    teacher/                 model 0: checkpoints/ export/ eval/
    round_<r>/targets/       round r's target set: shards + plan.json + progress/ + manifest.json
    round_<r>/student/       model r: checkpoints/ export/ tb/ metrics.jsonl consumed/ distill.json
    round_<r>/eval/          model r's evaluation (metrics.json, samples.txt, plot.png)
    control/                 the control run: checkpoints/ export/ eval/ tb/ (after all rounds' updates)
    control/round_<r>/       the control after round r's update count (r < rounds): export/ eval/
    ar/                      the AR model (pretrain --ar): checkpoints/ export/ tb/ metrics.jsonl
    report.json  report.md  quality_vs_steps.png

Models are named by a ``ModelRef``: ``0`` the teacher, ``r >= 1`` the student of round r,
``"control"`` the control run, ``"ar"`` the autoregressive model (the text judge and AR baseline; it is
not evaluated: no eval folder). Round r distils from model ``r - 1`` (``teacher_of``).

Standard library only: cluster/ imports it next to trainer.config. Paths are built from ``root``;
``RunLayout(Path())`` gives run-relative paths (the pipeline's product strings).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

EXIT_BAD_INPUT = 2  # the message names the key, file or shard (trainer.jobs.common.entry)
EXIT_HUNG = 3  # a collective timed out: another rank hangs or died (trainer.jobs.common.entry); rerun resumes
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the work so far is checkpointed (trainer.runtime.preempt)

CONTROL: Literal["control"] = "control"
AR: Literal["ar"] = "ar"
ModelRef = int | Literal["control", "ar"]  # 0 = teacher, r = round r's student, "control", "ar"

EXPORT_MANIFEST = "export.json"  # written last in an export folder (trainer/runtime/checkpoint.py)
EVAL_METRICS = "metrics.json"  # written last in an evaluation folder (trainer/jobs/evaluate.py)


@dataclass(frozen=True)
class RunLayout:
    root: Path

    # ---- the run -----------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state(self) -> Path:
        return self.root / "pipeline_state.json"

    @property
    def lock(self) -> Path:
        """Who writes this run folder now (trainer/runlock.py): one writer at a time."""
        return self.root / "run.lock.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def data(self) -> Path:
        """The default prepared-data folder (``data.cache_dir`` may name another)."""
        return self.root / "data"

    @property
    def data_info(self) -> Path:
        return self.data / "data.json"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    def round(self, r: int) -> Path:
        return self.root / f"round_{r}"

    def targets(self, r: int) -> Path:
        """Round r's target set (its manifest.json is written last)."""
        return self.round(r) / "targets"

    def targets_manifest(self, r: int) -> Path:
        return self.targets(r) / "manifest.json"

    # ---- models ------------------------------------------------------------------------------------
    def model_dir(self, m: ModelRef) -> Path:
        """Where a model's checkpoints and export live (and its metrics, for students and control)."""
        if m == CONTROL:
            return self.root / "control"
        if m == AR:
            return self.root / "ar"
        r = _round(m)
        return self.root / "teacher" if r == 0 else self.round(r) / "student"

    def checkpoints(self, m: ModelRef) -> Path:
        return self.model_dir(m) / "checkpoints"

    def export(self, m: ModelRef) -> Path:
        """The model's exported raw + EMA weights (what every later stage loads)."""
        return self.model_dir(m) / "export"

    def export_manifest(self, m: ModelRef) -> Path:
        """Written last in an export: its presence means the export is complete."""
        return self.export(m) / EXPORT_MANIFEST

    def eval(self, m: ModelRef) -> Path:
        """The model's evaluation folder (metrics.json, samples.txt, plot.png)."""
        if m == AR:
            raise ValueError("the AR model has no evaluation folder (trainer.jobs.evaluate evaluates diffusion models)")
        if m == CONTROL:
            return self.root / "control" / "eval"
        r = _round(m)
        return self.root / "teacher" / "eval" if r == 0 else self.round(r) / "eval"

    def control_export(self, r: int, rounds: int) -> Path:
        """The control's export after ``r`` rounds' updates (r x steps_per_round, the round-r student's
        count); after the last round it is the control's own export."""
        return self.export(CONTROL) if r == rounds else self.model_dir(CONTROL) / f"round_{_round(r)}" / "export"

    def control_eval(self, r: int, rounds: int) -> Path:
        """The evaluation of ``control_export(r, rounds)``."""
        return self.eval(CONTROL) if r == rounds else self.model_dir(CONTROL) / f"round_{_round(r)}" / "eval"

    def eval_metrics(self, m: ModelRef) -> Path:
        return self.eval(m) / EVAL_METRICS

    def control_eval_metrics(self, r: int, rounds: int) -> Path:
        return self.control_eval(r, rounds) / EVAL_METRICS

    def metrics(self, m: ModelRef) -> Path:
        """Where a model's training metrics go (tb/, metrics.jsonl): the run folder for the teacher,
        the model's own folder otherwise (students' ``train/*`` tags would collide at the same steps)."""
        return self.root if m == 0 else self.model_dir(m)

    @staticmethod
    def teacher_of(r: int) -> int:
        """The model round r distils from: the teacher for round 1, round r - 1's student after."""
        if r < 1:
            raise ValueError(f"round {r}: rounds are 1-based (0 is the teacher itself)")
        return r - 1

    def rel(self, path: Path) -> str:
        """``path`` relative to the run folder where possible (records stay true when a run folder moves)."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def _round(m: ModelRef) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"not a model: {m!r} (0 = teacher, r >= 1 = round r's student, or 'control')")
    return m
