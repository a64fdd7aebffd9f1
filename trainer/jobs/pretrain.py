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
from the extra training, not from SDTT (the case of an under-trained teacher).

With ``--ar`` it trains the autoregressive baseline instead (``<run>/ar/``): the same-size causal DiT
with next-token loss (trainer/method/autoregressive.py), the teacher's steps, batch and optimiser on
the same engine; ``val/nll`` is then its exact NLL. It is the text judge (``eval.judge=ar``) and the
AR baseline of ``tools/bench.py sampling``.
"""
from __future__ import annotations

import logging
import os

import torch

from trainer.data.prepared import MarkovSource, batches, data_dir, load_split, prepare_data
from trainer.distill.control import control_stream, stage
from trainer.distill.rounds import round_teacher
from trainer.evaluation.ar_report import AR_DIR, autoregressive_report
from trainer.evaluation.samples import sample_report
from trainer.evaluation.validation import validate
from trainer.jobs import common
from trainer.layout import EXIT_PREEMPTED, RunLayout
from trainer.method.autoregressive import ar_loss
from trainer.method.losses import mdlm_loss
from trainer.model.dit import DiT, count_parameters
from trainer.runtime import dist
from trainer.runtime.checkpoint import export_weights, load_exported
from trainer.runtime.engine import build_engine
from trainer.runtime.loop import Task, train
from trainer.runtime.metrics import MetricsWriter

log = logging.getLogger("sdtt")


def main(argv=None) -> int:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], argv=argv, flags={
        "--control": "train the control instead: the teacher continued with its own loss for the students' budget",
        "--ar": "train the autoregressive baseline (causal DiT, next-token loss) into <run>/ar instead"})
    cfg = common.run_config(args, write=dist.read_env(os.environ).rank == 0)
    info = dist.init_distributed(cfg.engine.collective_timeout_s)
    if args.ar and args.control:
        raise SystemExit("--ar and --control train different models: pass one")
    model_ref, setup, total_steps = stage(cfg, args.control)  # --ar: the teacher's setup and steps
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
    if args.control:  # the students' starting point: the weights that teach round 1
        teacher = round_teacher(layout, cfg, 1)
        model.load_state_dict(load_exported(teacher.export, teacher.weights, cfg.model)[0])
    engine = build_engine(model, setup, cfg.engine, total_steps, info.world_size)
    ckpt_root = args.run_dir / AR_DIR / "checkpoints" if args.ar else layout.checkpoints(model_ref)
    engine.load(ckpt_root, expect_model=cfg.model)
    metrics = MetricsWriter(args.run_dir / AR_DIR if args.ar else layout.metrics(model_ref))
    if engine.step == 0:
        metrics.config(cfg)
    log.info("%s: %d parameters, world %d, micro-batch %d x %d accumulation, from step %d of %d", name,
             count_parameters(model), info.world_size, engine.micro_batch, engine.grad_accum, engine.step,
             total_steps)

    source = MarkovSource(cfg.data.synthetic) if cfg.data.source == "synthetic" else None
    stream = {"it": None, "step": -1}

    def micro_batches(step: int) -> list[torch.Tensor]:
        # batches() is a pure function of the step: (re)start it wherever the loop is.
        if stream["step"] != step - 1 or stream["it"] is None:
            stream["it"] = batches(train_tokens, setup.global_batch_size, info.rank, info.world_size,
                                   cfg.data.seed, start_step=data_offset + step)
        _, local = next(stream["it"])
        stream["step"] = step
        return list(local.split(engine.micro_batch))

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
    task = Task(micro_batches=micro_batches, loss=loss,
                tokens_per_step=setup.global_batch_size * cfg.data.seq_len, samples_per_step=setup.global_batch_size,
                evaluate=evaluate, client_state=lambda: {"data_step": engine.step})
    finished = train(engine, task, cfg.train, cfg, ckpt_root, metrics, total_steps, noise_seed, desc=name)
    if not finished:
        metrics.close()
        return EXIT_PREEMPTED

    # ---- export -----------------------------------------------------------------------------------
    raw = engine.consolidated_state_dict()  # collective
    ema = engine.ema_state_dict()
    if info.is_main:
        export = args.run_dir / AR_DIR / "export" if args.ar else layout.export(model_ref)
        out = export_weights(export, raw, ema if ema is not None else raw, cfg, step=engine.step, overwrite=True)
        log.info("exported %s to %s", name, out)
    metrics.close()
    dist.barrier()
    dist.cleanup()
    return 0


if __name__ == "__main__":
    common.entry(main)
