"""Where a round starts: its teacher (``round_teacher``) and the student's init (``plan_init``).

* Teacher of round r: model r - 1's export (``RunLayout.teacher_of``: the pretrained/imported
  teacher for round 1, round r - 1's student after), weight file ``teacher_weights(cfg, r)``: the
  same rule for the targets job, the distill job and the control run.
* Student init, decided once per round and recorded in every checkpoint (``init``):
  - this round has a checkpoint: resume it (weights, optimizer, EMA, RNG, data position);
  - else, unless ``distill.reset_optimizer``, round r - 1's final DeepSpeed checkpoint (weights +
    optimizer + EMA), continuing its step count: the round trains from step S to S + steps_per_round
    (S = (r - 1) steps_per_round when no round was reset), the lr schedule is not warmed up again;
  - else the teacher's weight file, a fresh optimizer and EMA, steps 0 .. steps_per_round. The exact
    teacher of a Markov source (``teacher.source=oracle``) has no network weights: round 1's student
    then starts from ``teacher.init_from``'s export (its ``targets.use_ema`` weights) or, with none, from
    a seeded random init (``train.seed``); the control starts from the same (``fresh_start``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from trainer.config import RunConfig
from trainer.errors import StageError
from trainer.layout import EXPORT_MANIFEST, RunLayout
from trainer.model.oracle import KIND as ORACLE
from trainer.runtime import dist
from trainer.runtime.checkpoint import WEIGHT_FILES, CheckpointDir, export_kind, read_json, verify_file
from trainer.targets.header import TeacherId

log = logging.getLogger("sdtt")


def teacher_weights(cfg: RunConfig, round_idx: int) -> str:
    """Which exported weights teach round ``round_idx``: the pretrained/imported teacher's EMA (or
    raw, ``targets.use_ema``) in round 1; after that the previous student's raw weights, or its EMA
    with ``distill.ema_as_teacher`` (SDTT: "the teacher becomes the student, optionally its EMA")."""
    if round_idx <= 1:
        return "ema" if cfg.targets.use_ema else "raw"
    return "ema" if cfg.distill.ema_as_teacher else "raw"


@dataclass(frozen=True)
class TeacherRef:
    """Round r's teacher: its export folder, which weights, the weight file and its sha256 (as
    export.json records it)."""

    export: Path
    weights: str  # ema | raw
    file: Path
    sha256: str

    def verify(self) -> None:
        """Size and sha256 of the weight file against export.json (a CheckpointError names it)."""
        verify_file(self.file, read_json(self.export / EXPORT_MANIFEST)["files"][WEIGHT_FILES[self.weights]])

    def id(self, layout: RunLayout) -> TeacherId:
        """What a target-set header records of the teacher."""
        return TeacherId(layout.rel(self.export), self.weights, self.sha256)


def round_teacher(layout: RunLayout, cfg: RunConfig, round_idx: int) -> TeacherRef:
    """The weights round ``round_idx`` distils from (see the module docstring); a missing export is
    an error naming the folder."""
    export = layout.export(layout.teacher_of(round_idx))
    weights = teacher_weights(cfg, round_idx)
    info_path = layout.export_manifest(layout.teacher_of(round_idx))
    if not info_path.is_file():
        raise StageError(f"no teacher export at {export} (export.json missing): round 1 needs the pretrained or "
                         "imported teacher, round r the student export of round r - 1")
    entry = read_json(info_path)["files"].get(WEIGHT_FILES[weights])
    if entry is None:
        raise StageError(f"{info_path}: has no entry for {WEIGHT_FILES[weights]}")
    return TeacherRef(export, weights, export / WEIGHT_FILES[weights], entry["sha256"])


@dataclass(frozen=True)
class Init:
    kind: str  # resume | continue | export | scratch
    path: str  # checkpoint root, or the export's weight file ("" from scratch)
    round_start: int  # the engine step the round starts at
    record: dict  # what the checkpoints and distill.json say about the init

    def describe(self) -> str:
        return {"resume": f"resuming this round's checkpoint in {self.path}",
                "continue": f"round {self.record.get('from_round')}'s checkpoint {self.path} "
                            f"(weights, optimizer, EMA), continuing from step {self.round_start}",
                "export": f"{self.path} with a fresh optimizer",
                "scratch": f"a random init (seed {self.record.get('seed')}): the exact teacher has no network "
                           "weights and teacher.init_from is empty"}[self.kind]


def fresh_start(cfg: RunConfig, layout: RunLayout, teacher_file: Path) -> Init:
    """Where a student (or the control) starts when it continues no checkpoint: the teacher's weight
    file, or, for the exact teacher (no network weights), ``teacher.init_from``'s export or scratch."""
    if export_kind(teacher_file.parent) != ORACLE:
        return Init("export", str(teacher_file), 0, {"from": "export", "path": layout.rel(teacher_file), "step": 0})
    if cfg.teacher.init_from:
        file = Path(cfg.teacher.init_from) / WEIGHT_FILES[teacher_weights(cfg, 1)]
        if not (file.parent / EXPORT_MANIFEST).is_file():
            raise StageError(f"bad config key 'teacher.init_from': {file.parent} is not an export (no export.json)")
        if export_kind(file.parent) == ORACLE:
            raise StageError(f"bad config key 'teacher.init_from': {file.parent} is an exact teacher, not network "
                             "weights")
        return Init("export", str(file), 0, {"from": "teacher.init_from", "path": str(file), "step": 0})
    return Init("scratch", "", 0, {"from": "scratch", "seed": cfg.train.seed, "step": 0})


def plan_init(cfg: RunConfig, layout: RunLayout, round_idx: int, teacher_file: Path) -> Init:
    """How round ``round_idx``'s student starts (see the module docstring)."""
    own = CheckpointDir(layout.checkpoints(round_idx))
    tag = own.latest()
    if tag is not None:
        client = own.client_state(tag)
        if client.get("round") != round_idx or "round_start" not in client:
            raise StageError(f"{own.client_state_path(tag)}: not a round-{round_idx} distillation checkpoint "
                             "(no round/round_start)")
        return Init("resume", str(own.root), int(client["round_start"]), dict(client.get("init", {})))
    if round_idx > 1 and not cfg.distill.reset_optimizer:
        prev = CheckpointDir(layout.checkpoints(round_idx - 1))
        prev_tag = prev.latest()
        if prev_tag is not None:
            step = int(prev.meta(prev_tag)["step"])
            export = read_json(layout.export_manifest(round_idx - 1))
            if int(export["step"]) != step:
                raise StageError(f"{prev.root}: the latest checkpoint is at step {step} but round {round_idx - 1}'s "
                                 f"export (this round's teacher) is of step {export['step']}; finish round "
                                 f"{round_idx - 1} or set distill.reset_optimizer=true")
            return Init("continue", str(prev.root), step,
                        {"from": "checkpoint", "from_round": round_idx - 1,
                         "path": layout.rel(prev.root / prev_tag), "step": step})
        log.warning("round %d: no checkpoint of round %d in %s: starting from the export with a fresh optimizer",
                    round_idx, round_idx - 1, prev.root)
    return fresh_start(cfg, layout, teacher_file)


def agree_init(cfg: RunConfig, layout: RunLayout, round_idx: int, teacher_file: Path) -> Init:
    """``plan_init`` on rank 0, once (its warnings once); its verdict, or its error, reaches every
    rank (a collective: no rank waits alone)."""
    planned: tuple[Init | None, str | None] = (None, None)
    if dist.is_main():
        try:
            planned = (plan_init(cfg, layout, round_idx, teacher_file), None)
        except (StageError, KeyError, OSError) as e:
            planned = (None, f"{type(e).__name__}: {e}" if isinstance(e, (KeyError, OSError)) else str(e))
    init, error = dist.broadcast_object(planned)
    if error is not None or init is None:
        raise StageError(error or "no init plan")
    return init


def check_resume(data: dict, step: int, streams: int, global_batch: int, resample: bool, set_digest: str,
                 skipped: list[str], where: Path) -> None:
    """The order a checkpoint's data position refers to must be the one this run would read, at
    ``step`` of the round."""
    for key, now in (("streams", streams), ("global_batch", global_batch), ("resample", resample),
                     ("targets", set_digest)):
        if data.get(key) != now:
            hint = " (set distill.streams to the checkpoint's value)" if key == "streams" else ""
            raise StageError(f"{where}: the checkpoint's data position is for {key}={data.get(key)!r}, this run "
                             f"has {now!r}: the sample order would change{hint}")
    if data.get("step") != step:
        raise StageError(f"{where}: the checkpoint records data step {data.get('step')}, expected {step} (steps "
                         "since the round's start)")
    if sorted(data.get("skipped", [])) != sorted(skipped):
        log.warning("%s: skipped shards changed since the checkpoint (%s -> %s): the remaining order differs from an "
                    "uninterrupted run", where, data.get("skipped"), skipped)


def round_record(cfg: RunConfig, layout: RunLayout, round_idx: int, init: Init, final_step: int, samples: int,
                 targets: str, bad: list, teacher: TeacherRef) -> dict:
    """The round's ``distill.json``: how it started, what it consumed, its teacher and the next one's weights."""
    return {
        "round": round_idx, "mode": cfg.distill.mode, "init": init.record, "round_start": init.round_start,
        "final_step": final_step, "samples_consumed": samples, "targets": targets,
        "skipped_shards": [[b.name, b.reason] for b in bad], "teacher": layout.rel(teacher.file),
        "teacher_weights": teacher.weights, "teacher_sha256": teacher.sha256,
        "next_teacher_weights": teacher_weights(cfg, round_idx + 1)}


def data_position(cfg: RunConfig, step: int, streams: int, targets: str, bad: list, samples_consumed: int) -> dict:
    """The round's data position saved in every checkpoint (what ``check_resume`` checks on resume)."""
    return {"step": step, "streams": streams, "global_batch": cfg.distill.global_batch_size,
            "resample": cfg.distill.resample, "targets": targets, "skipped": sorted(b.name for b in bad),
            "samples_consumed": samples_consumed}
