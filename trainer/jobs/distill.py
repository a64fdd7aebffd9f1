"""SDTT student training for one round, on DeepSpeed ZeRO.

    python -m trainer.jobs.distill --run-dir DIR --round R [--config FILE] [key=value ...]
    torchrun --nproc_per_node N -m trainer.jobs.distill --run-dir DIR --round R ...

Teacher and student init: trainer/distill/rounds.py and student.py; the micro-batches (``distill.mode``:
offline from the round's target set, online from the teacher) and the loss: trainer/distill/batches.py.
The target set's manifest is checked against this student BEFORE anything trains. Output in
``DIR/round_R/student``: checkpoints, metrics, ``distill.json`` and the raw + EMA export (the next
round's teacher); with ``distill.log_consumed`` every rank's sample indices per step in ``consumed/``.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from trainer.config import RunConfig, round_steps
from trainer.data.prepared import data_dir, load_data_info
from trainer.data.synthetic import MarkovSource
from trainer.distill import rounds
from trainer.distill.batches import RoundStream, check_round_data, distill_loss, probe_loss, round_source
from trainer.distill.consumed import ConsumedLog
from trainer.distill.student import build_student
from trainer.errors import StageError
from trainer.evaluation.samples import sample_report
from trainer.fileio import atomic_write_json
from trainer.jobs import common
from trainer.layout import EXIT_PREEMPTED, RunLayout
from trainer.model.dit import count_parameters
from trainer.runtime import dist
from trainer.runtime.checkpoint import export_weights
from trainer.runtime.loop import Task, train
from trainer.runtime.metrics import MetricsWriter
from trainer.targets import reader

log = logging.getLogger("sdtt")

# Test hook: sleep this long per step (a wider window for a test to kill a run between checkpoints).
STEP_DELAY_ENV = "SDTT_DISTILL_STEP_DELAY_S"


def run(cfg: RunConfig, layout: RunLayout, round_idx: int, info: dist.DistInfo) -> int:
    dcfg = cfg.distill
    if not 1 <= round_idx <= dcfg.rounds:
        raise StageError(f"--round {round_idx} is outside 1..distill.rounds={dcfg.rounds}")
    teacher = rounds.round_teacher(layout, cfg, round_idx)
    teacher.verify()
    ddir = data_dir(cfg.data, layout.root)
    data_info = load_data_info(ddir)
    sdir, ckpt_root = layout.model_dir(round_idx), layout.checkpoints(round_idx)

    # ---- check the data before anything trains ---------------------------------------------------
    rd = check_round_data(cfg, layout, round_idx, teacher, data_info, ddir / "data.json")  # collective
    geo = reader.geometry(dcfg.global_batch_size, info.world_size, info.rank, dcfg.streams, dcfg.loader_workers)
    order = reader.SampleOrder(rd.units, geo.streams, cfg.seed, round_idx, resample=dcfg.resample)

    # ---- build the student: its init (planned on rank 0, agreed by all), engine, resume position ------
    init = rounds.agree_init(cfg, layout, round_idx, teacher.file)
    total = init.round_start + dcfg.steps_per_round
    model, engine, client = build_student(cfg, init, teacher, total, info.world_size)
    data_state = client.get("data", {})
    if data_state:
        rounds.check_resume(data_state, engine.step - init.round_start, geo.streams, geo.streams * geo.per_stream,
                            dcfg.resample, rd.digest, [b.name for b in rd.bad], ckpt_root)
    consumed_before = int(data_state.get("samples_consumed", 0))
    metrics = MetricsWriter(layout.metrics(round_idx))
    if engine.step == init.round_start:
        metrics.config(cfg)
    metrics.scalars(engine.step, {"data/skipped_shards": float(len(rd.bad))})
    log.info("distill round %d (%s, %s targets, %s): student %d parameters from %s; steps %d -> %d of %d (global "
             "batch %d = %d ranks x %d x %d accumulation); teacher %s (%s, %s...); data: %s; skipped shards: %d",
             round_idx, dcfg.mode, rd.codec, dcfg.divergence, count_parameters(model), init.describe(), engine.step,
             total, total - init.round_start, dcfg.global_batch_size, info.world_size, engine.micro_batch,
             engine.grad_accum, teacher.export, teacher.weights, teacher.sha256[:12], reader.describe(order, geo),
             len(rd.bad))

    # ---- build the data: complete micro-batches, offline or online -------------------------------
    consumed = ConsumedLog(sdir / "consumed", info.rank, engine.step) if dcfg.log_consumed else None
    source = round_source(cfg, layout, round_idx, teacher, rd, order, geo, engine.device, engine.micro_batch,
                          init.round_start, consumed)
    stream = RoundStream(source, cfg, round_idx, init, rd, geo.streams, consumed_before, info.world_size,
                         delay_s=float(os.environ.get(STEP_DELAY_ENV, "0") or 0))

    # ---- evaluation: probe loss, then samples at the round's student step count --------------------
    markov = MarkovSource(cfg.data.synthetic) if cfg.data.source == "synthetic" else None
    eval_cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, steps=round_steps(cfg, round_idx)))

    def evaluate(step: int) -> dict[str, float]:  # the probe: this rank's first samples of the round; scored first
        scalars = {"eval/probe_loss": probe_loss(engine, source.probe(), cfg, dcfg.divergence)}
        sample_scalars, text = sample_report(engine, eval_cfg, markov, engine.device)
        metrics.text(step, "samples", text)
        scalars = {**sample_scalars, **scalars, "data/skipped_shards": float(len(rd.bad))}
        if not dcfg.resample:  # (a resampled stream has draws, not epochs)
            scalars["data/epoch"] = float(source.epoch)
        return scalars

    # ---- train ------------------------------------------------------------------------------------
    global_batch = dcfg.global_batch_size
    task = Task(source=stream, loss=lambda e, b, _g: distill_loss(e, b, cfg, dcfg.divergence),
                tokens_per_step=global_batch * cfg.data.seq_len, samples_per_step=global_batch, evaluate=evaluate)
    seed = int(np.random.SeedSequence([cfg.train.seed, round_idx]).generate_state(1)[0])
    try:
        finished = train(engine, task, cfg.train, cfg, ckpt_root, metrics, total, seed, desc=f"distill r{round_idx}")
    finally:
        stream.close()
    if not finished:
        metrics.close()
        return EXIT_PREEMPTED

    # ---- account and export -------------------------------------------------------------------------
    n = stream.consumed_total()  # collective
    if n != (engine.step - init.round_start) * global_batch:  # by construction; a loud check
        raise StageError(f"consumed {n} samples over {engine.step - init.round_start} steps of {global_batch}: "
                         f"expected {(engine.step - init.round_start) * global_batch}")
    metrics.scalars(engine.step, {"data/samples_consumed": float(n)})
    raw = engine.consolidated_state_dict()  # collective
    ema = engine.ema_state_dict()
    if info.is_main:
        atomic_write_json(sdir / "distill.json", rounds.round_record(cfg, layout, round_idx, init, engine.step, n,
                                                                     rd.digest, rd.bad, teacher))
        out = export_weights(layout.export(round_idx), raw, ema if ema is not None else raw, cfg, step=engine.step,
                             overwrite=True)
        log.info("round %d: %d samples consumed; exported the student to %s (next round's teacher: its %s weights)",
                 round_idx, n, out, rounds.teacher_weights(cfg, round_idx + 1))
    metrics.close()
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], with_round=True, argv=argv)
    cfg = common.run_config(args)
    info = dist.init_distributed(cfg.engine.collective_timeout_s)
    try:
        return run(cfg, RunLayout(args.run_dir), args.round, info)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    common.entry(main)
