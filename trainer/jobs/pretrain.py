"""Pretrain the MDLM teacher on DeepSpeed ZeRO.

    python -m trainer.jobs.pretrain --run-dir DIR [--config FILE] [key=value ...]
    torchrun --nproc_per_node N -m trainer.jobs.pretrain --run-dir DIR ...

Reads the prepared token data (``<run>/data``, written by trainer.jobs.prepare; prepared here if
absent), trains with the MDLM ELBO, keeps an EMA of the weights, reports the validation NLL bound and
a few samples every ``train.eval_every`` steps, checkpoints to ``<run>/teacher/checkpoints`` every
``train.ckpt_every`` steps and resumes from the latest one on restart. At the end it exports the
consolidated raw and EMA weights to ``<run>/teacher/export``: what every later stage loads.

With ``--control`` it trains the *control* instead (``<run>/control/``; its budget, data stream and
noise: trainer/distill/control.py): a student that beats its teacher but not the control has gained
from the extra training, not from SDTT (the case of an under-trained teacher). It is exported after
every round's update count (``<run>/control/round_<r>/export``; the last round's is ``control/export``),
so each round's student is compared with the control at equal updates.

With ``--ar`` it trains the autoregressive baseline instead (``<run>/ar/``): the same-size causal DiT
with next-token loss (trainer/method/autoregressive.py), the teacher's steps, batch and optimiser on
the same engine; ``val/nll`` is then its exact NLL. It is the text judge (``eval.judge=ar``) and the
AR baseline of ``tools/bench.py sampling``.
"""
from __future__ import annotations

import logging
import os

import torch

from trainer.config import RunConfig
from trainer.data.prepared import data_dir, load_split, prepare_data
from trainer.data.stream import PretrainBatches
from trainer.data.synthetic import MarkovSource
from trainer.distill.control import control_stream, round_ends, stage
from trainer.distill.rounds import fresh_start, round_teacher
from trainer.errors import BadInput, StageError
from trainer.evaluation.ar_report import autoregressive_report
from trainer.evaluation.samples import sample_report
from trainer.evaluation.validation import validate
from trainer.jobs import common
from trainer.layout import AR, EXIT_PREEMPTED, EXPORT_MANIFEST, RunLayout
from trainer.method.autoregressive import ar_loss
from trainer.method.losses import mdlm_loss
from trainer.model.dit import DiT, count_parameters
from trainer.runtime import dist
from trainer.runtime.checkpoint import export_weights, load_weight_file
from trainer.runtime.engine import build_engine
from trainer.runtime.loop import Task, train
from trainer.runtime.metrics import MetricsWriter

log = logging.getLogger("sdtt")


def main(argv=None) -> int:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], argv=argv, flags={
        "--control": "train the control instead: the teacher continued with its own loss for the students' budget",
        "--ar": "train the autoregressive baseline (causal DiT, next-token loss) into <run>/ar instead"})
    if args.ar and args.control:  # before the run's config is written: bad flags leave the folder as it was
        raise BadInput("--ar and --control train different models: pass one")
    cfg = common.run_config(args, write=dist.read_env(os.environ).rank == 0)
    info = dist.init_distributed(cfg.engine.collective_timeout_s)
    try:  # also when stopped early (preempted): a process group left up at exit can abort the rank
        return _train(cfg, args, info)
    finally:
        dist.cleanup()


def _train(cfg: RunConfig, args, info: dist.DistInfo) -> int:
    """Build the data, model and engine of the stage (teacher, control or AR) and train it, exporting
    at every end (the control: every round's update count); EXIT_PREEMPTED when stopped early."""
    model_ref, setup, total_steps = stage(cfg, args.control)  # --ar: the teacher's setup and steps
    model_ref = AR if args.ar else model_ref
    data_offset, noise_seed = control_stream(cfg, args.control)
    layout = RunLayout(args.run_dir)
    name = "control" if args.control else "ar" if args.ar else "teacher"

    # ---- build the data ---------------------------------------------------------------------------
    data = data_dir(cfg.data, args.run_dir)
    if info.is_main:
        prepare_data(cfg.data, data)  # a no-op when the prepare stage already ran
    dist.barrier()
    train_tokens, valid = load_split(data, "train"), torch.from_numpy(load_split(data, "valid").astype("int64"))

    # ---- build the model --------------------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = DiT(cfg.model, causal=args.ar)
    if args.control:  # the students' starting point: the weights that teach round 1 (or, for the exact
        # teacher, teacher.init_from's or the seeded random init: trainer/distill/rounds.py)
        start = fresh_start(cfg, layout, round_teacher(layout, cfg, 1).file)
        log.info("control starts from %s", start.describe())
        if start.kind == "export":
            model.load_state_dict(load_weight_file(start.path, cfg.model))
    engine = build_engine(model, setup, cfg.engine, total_steps, info.world_size)
    ckpt_root = layout.checkpoints(model_ref)
    engine.load(ckpt_root, expect_model=cfg.model)
    metrics = MetricsWriter(layout.metrics(model_ref))
    if engine.step == 0:
        metrics.config(cfg)
    log.info("%s: %d parameters, world %d, micro-batch %d x %d accumulation, from step %d of %d", name,
             count_parameters(model), info.world_size, engine.micro_batch, engine.grad_accum, engine.step,
             total_steps)

    source = MarkovSource(cfg.data.synthetic) if cfg.data.source == "synthetic" else None
    stream = PretrainBatches(train_tokens, setup.global_batch_size, info.rank, info.world_size, cfg.data.seed,
                             engine.micro_batch, offset=data_offset)

    def evaluate(step: int) -> dict[str, float]:
        if args.ar:
            return autoregressive_report(engine, valid, cfg, source, metrics, step, info.rank, info.world_size)
        scalars = {"val/nll": validate(engine, valid, cfg, info.rank, info.world_size)}
        sample_scalars, text = sample_report(engine, cfg, source, engine.device)
        metrics.text(step, "samples", text)
        return {**scalars, **sample_scalars}

    # ---- train ------------------------------------------------------------------------------------
    loss = (lambda e, x0, g: ar_loss(e, x0.to(e.device), cfg.model.vocab_size)) if args.ar else \
        (lambda e, x0, g: mdlm_loss(e, x0.to(e.device), g, cfg))
    task = Task(source=stream, loss=loss,
                tokens_per_step=setup.global_batch_size * cfg.data.seq_len, samples_per_step=setup.global_batch_size,
                evaluate=evaluate)
    # The control stops at every round's update count and is exported there (control@r: the round-r
    # student's match); the teacher and the AR model run in one piece.
    ends = round_ends(cfg) if args.control else [total_steps]
    for r, end in enumerate(ends, start=1):
        export = layout.control_export(r, cfg.distill.rounds) if args.control else layout.export(model_ref)
        if end < total_steps and (export / EXPORT_MANIFEST).exists():
            continue  # a resumed control: this round's export was written before
        if engine.step > end:
            raise StageError(f"{ckpt_root}: resumed at step {engine.step}, past round {r}'s {end} updates, but "
                             f"{export} is missing: delete {layout.model_dir(model_ref)} and train the control again")
        if not train(engine, task, cfg.train, cfg, ckpt_root, metrics, end, noise_seed, desc=name):
            metrics.close()
            return EXIT_PREEMPTED
        raw = engine.consolidated_state_dict()  # collective
        ema = engine.ema_state_dict()
        if info.is_main:
            out = export_weights(export, raw, ema if ema is not None else raw, cfg, step=engine.step, overwrite=True)
            log.info("exported %s after %d updates to %s", name, engine.step, out)
        dist.barrier()
    metrics.close()
    dist.barrier()
    return 0


if __name__ == "__main__":
    common.entry(main)
