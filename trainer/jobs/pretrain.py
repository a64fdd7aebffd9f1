"""Pretrain the MDLM teacher on DeepSpeed ZeRO.

    python -m trainer.jobs.pretrain --run-dir DIR [--config FILE] [key=value ...]
    torchrun --nproc_per_node N -m trainer.jobs.pretrain --run-dir DIR ...

Reads the prepared token data (``<run>/data``, written by trainer.jobs.prepare; prepared here if
absent), trains with the MDLM ELBO, keeps an EMA of the weights, reports the validation NLL bound and
a few samples every ``train.eval_every`` steps, checkpoints to ``<run>/teacher/checkpoints`` every
``train.ckpt_every`` steps and resumes from the latest one on restart. At the end it exports the
consolidated raw and EMA weights to ``<run>/teacher/export``: what every later stage loads.
"""
from __future__ import annotations

import logging

import torch

from trainer import diffusion, dist, sampling
from trainer.checkpoint import export_weights
from trainer.config import RunConfig
from trainer.data import MarkovSource, batches, data_dir, load_split, prepare_data
from trainer.engine import Engine, build_engine
from trainer.jobs import common
from trainer.loop import Task, step_generator, train
from trainer.metrics import MetricsWriter
from trainer.metrics_quality import markov_quality
from trainer.model import DiT, count_parameters
from trainer.preempt import EXIT_PREEMPTED

log = logging.getLogger("sdtt")


def mdlm_loss(engine: Engine, x0: torch.Tensor, gen: torch.Generator, cfg: RunConfig) -> torch.Tensor:
    """The MDLM ELBO on one micro-batch: mask at a random time, predict the masked tokens."""
    mask_id, eps = cfg.model.vocab_size, cfg.diffusion.noise_eps
    x0 = x0.to(engine.device)
    t = diffusion.sample_times(x0.shape[0], gen, cfg.diffusion.train_eps, cfg.diffusion.antithetic)
    xt = diffusion.mask_tokens(x0, t, mask_id, eps, gen)
    sigma = diffusion.sigma_of_t(t, eps).to(engine.device) if cfg.model.time_conditioning else None
    log_probs = diffusion.subs_log_probs(engine(xt, sigma), xt, mask_id)
    return diffusion.elbo_nll(log_probs, x0, xt, t, mask_id, eps).mean()


def validate(engine: Engine, valid: torch.Tensor, cfg: RunConfig, rank: int, world: int) -> float:
    """The validation NLL bound (nats/token) over ``train.eval_batches`` batches, with fixed noise so
    successive evaluations are comparable; a collective over ranks."""
    engine.eval()
    n = cfg.engine.global_batch_size // world
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(cfg.train.eval_batches):
            start = (b * world + rank) * n
            x0 = valid[start % len(valid):][:n]
            if len(x0) == 0:
                break
            gen = step_generator(cfg.train.seed + 1, b, rank)
            total += float(mdlm_loss(engine, x0, gen, cfg)) * len(x0)
            count += len(x0)
    engine.train()
    return dist.all_reduce_mean(total / max(count, 1))


def sample_report(engine: Engine, cfg: RunConfig, source: MarkovSource | None, n: int = 16) -> tuple[dict, str]:
    """A few samples at ``sampling.steps`` from the current weights. Every rank samples the same
    sequences with the same seed (under ZeRO-3 each forward is a collective, so all ranks must make
    the same calls)."""
    engine.eval()
    mask_id = cfg.model.vocab_size
    denoise = sampling.make_denoiser(engine, mask_id, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    x = sampling.sample_diffusion(denoise, n, cfg.data.seq_len, cfg.sampling.steps, mask_id,
                                  noise_eps=cfg.diffusion.noise_eps, sampling_eps=cfg.diffusion.sampling_eps,
                                  generator=torch.Generator().manual_seed(cfg.sampling.seed), device=engine.device,
                                  cache=cfg.sampling.cache and not cfg.model.time_conditioning).cpu()
    engine.train()
    scalars = {}
    if source is not None:
        q = markov_quality(source, x)
        scalars = {f"sample/nll@{cfg.sampling.steps}": q["nll"], f"sample/entropy@{cfg.sampling.steps}": q["entropy"]}
    text = "\n\n".join(" ".join(map(str, row.tolist())) for row in x[:4])
    return scalars, text


def main(argv=None) -> int:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], argv=argv)
    info = dist.init_distributed()
    cfg = common.run_config(args, write=info.is_main)
    data = data_dir(cfg.data, args.run_dir)
    if info.is_main:
        prepare_data(cfg.data, data)  # a no-op when the prepare stage already ran
    dist.barrier()
    train_tokens, valid = load_split(data, "train"), torch.from_numpy(load_split(data, "valid").astype("int64"))

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = DiT(cfg.model)
    engine = build_engine(model, cfg.optim, cfg.engine, cfg.train.steps, info.world_size, ema_decay=cfg.train.ema)
    ckpt_root = args.run_dir / "teacher" / "checkpoints"
    engine.load(ckpt_root, expect_model=cfg.model)
    metrics = MetricsWriter(args.run_dir)
    if engine.step == 0:
        metrics.config(cfg)
    log.info("teacher: %d parameters, world %d, micro-batch %d x %d accumulation, from step %d",
             count_parameters(model), info.world_size, engine.micro_batch, engine.grad_accum, engine.step)

    source = MarkovSource(cfg.data.synthetic) if cfg.data.source == "synthetic" else None
    stream = {"it": None, "step": -1}

    def micro_batches(step: int) -> list[torch.Tensor]:
        # batches() is a pure function of the step: (re)start it wherever the loop is.
        if stream["step"] != step - 1 or stream["it"] is None:
            stream["it"] = batches(train_tokens, cfg.engine.global_batch_size, info.rank, info.world_size,
                                   cfg.data.seed, start_step=step)
        _, local = next(stream["it"])
        stream["step"] = step
        return list(local.split(engine.micro_batch))

    def evaluate(step: int) -> dict[str, float]:
        scalars = {"val/nll": validate(engine, valid, cfg, info.rank, info.world_size)}
        sample_scalars, text = sample_report(engine, cfg, source)
        metrics.text(step, "samples", text)
        return {**scalars, **sample_scalars}

    task = Task(micro_batches=micro_batches, loss=lambda e, x0, g: mdlm_loss(e, x0, g, cfg),
                tokens_per_step=cfg.engine.global_batch_size * cfg.data.seq_len,
                samples_per_step=cfg.engine.global_batch_size, evaluate=evaluate,
                client_state=lambda: {"data_step": engine.step})
    finished = train(engine, task, cfg.train, cfg, ckpt_root, metrics, cfg.train.steps, cfg.train.seed, desc="pretrain")
    if not finished:
        metrics.close()
        return EXIT_PREEMPTED

    raw = engine.consolidated_state_dict()  # collective
    ema = engine.ema_state_dict()
    if info.is_main:
        out = export_weights(args.run_dir / "teacher" / "export", raw, ema if ema is not None else raw, cfg,
                             step=engine.step, overwrite=True)
        log.info("exported teacher to %s", out)
    metrics.close()
    dist.barrier()
    dist.cleanup()
    return 0


if __name__ == "__main__":
    common.entry(main)
