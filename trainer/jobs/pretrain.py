"""Pretrain the MDLM teacher on DeepSpeed ZeRO.

    python -m trainer.jobs.pretrain --run-dir DIR [--config FILE] [key=value ...]
    torchrun --nproc_per_node N -m trainer.jobs.pretrain --run-dir DIR ...

Reads the prepared token data (``<run>/data``, written by trainer.jobs.prepare; prepared here if
absent), trains with the MDLM ELBO, keeps an EMA of the weights, reports the validation NLL bound and
a few samples every ``train.eval_every`` steps, checkpoints to ``<run>/teacher/checkpoints`` every
``train.ckpt_every`` steps and resumes from the latest one on restart. At the end it exports the
consolidated raw and EMA weights to ``<run>/teacher/export``: what every later stage loads.

With ``--control`` it trains the *control* instead (``<run>/control/``): the students' starting weights
trained on with the MDLM loss for the same number of steps, batch size, learning rate and EMA as all
the distillation rounds together, on the teacher's data stream from where the teacher stopped
(examples it has not seen) and with per-step noise from its own seed domain (``Plan``). A student
that beats its teacher but not the control has gained from the extra training, not from SDTT
(shared/notes/sdtt-method.md: an under-trained teacher).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import RunConfig
from trainer.data.prepared import MarkovSource, batches, data_dir, load_split, prepare_data
from trainer.evaluation.quality import markov_quality
from trainer.jobs import common
from trainer.method import diffusion, sampling
from trainer.model.dit import DiT, count_parameters
from trainer.runtime import dist
from trainer.runtime.checkpoint import export_weights, load_exported
from trainer.runtime.engine import Engine, build_engine
from trainer.runtime.loop import Task, step_generator, train
from trainer.runtime.metrics import MetricsWriter
from trainer.runtime.preempt import EXIT_PREEMPTED

log = logging.getLogger("sdtt")


def mdlm_loss(engine: Engine, x0: torch.Tensor, gen: torch.Generator, cfg: RunConfig) -> torch.Tensor:
    """The MDLM ELBO on one micro-batch: mask at a random time, predict the masked tokens."""
    mask_id, eps = cfg.model.vocab_size, cfg.diffusion.noise_eps
    x0 = x0.to(engine.device)
    t = diffusion.sample_times(x0.shape[0], gen, cfg.diffusion.train_eps, cfg.diffusion.antithetic)
    xt = diffusion.mask_tokens(x0, t, mask_id, eps, gen)
    sigma = diffusion.sigma_of_t(t, eps).to(engine.device) if cfg.model.time_conditioning else None
    # The head runs on the masked positions only: the loss is taken nowhere else.
    log_probs = diffusion.masked_log_probs(engine(xt, sigma, rows=xt == mask_id), mask_id)
    return diffusion.elbo_nll_at(log_probs, x0, xt, t, mask_id, eps).mean()


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


CONTROL_SEED_DOMAIN = 0xC0  # the control's per-step noise (t, mask): a stream the teacher never drew


@dataclass(frozen=True)
class Plan:
    """What this invocation trains: the teacher, or the control (the teacher trained on with its own
    MDLM loss for the students' whole budget: same steps, batch, lr and EMA as distillation).

    data_offset: the first step of ``batches`` (at ``global_batch``) this run reads. The control
    continues the teacher's data stream where the teacher stopped (the examples after its last
    one), so it trains on what the teacher has not seen yet, as the students do, instead of
    replaying the teacher's first batches. noise_seed: the seed of the per-step noise (t and mask);
    the control's comes from its own domain, so no (x0, t, mask) example repeats one of the teacher's.
    """

    name: str
    total_steps: int
    global_batch: int
    engine_kwargs: dict
    data_offset: int = 0
    noise_seed: int = 0


def control_noise_seed(train_seed: int) -> int:
    """The control's step-noise seed: a hash of (train.seed, CONTROL_SEED_DOMAIN), unrelated to train.seed."""
    state = np.random.SeedSequence([train_seed, CONTROL_SEED_DOMAIN]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def plan(cfg: RunConfig, control: bool) -> Plan:
    if not control:
        return Plan("teacher", cfg.train.steps, cfg.engine.global_batch_size, {"ema_decay": cfg.train.ema},
                    noise_seed=cfg.train.seed)
    d = cfg.distill
    # The teacher consumed train.steps x its global batch examples; continue after them at the
    # control's batch (rounded up: never re-read the teacher's last examples).
    seen = cfg.train.steps * cfg.engine.global_batch_size
    return Plan("control", d.rounds * d.steps_per_round, d.global_batch_size,
                {"lr": d.lr, "warmup_steps": d.warmup_steps, "global_batch_size": d.global_batch_size,
                 "ema_decay": d.ema, "key": "distill"},
                data_offset=-(-seen // d.global_batch_size), noise_seed=control_noise_seed(cfg.train.seed))


def main(argv=None) -> int:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], argv=argv, flags={
        "--control": "train the control instead: the teacher continued with its own loss for the students' budget"})
    info = dist.init_distributed()
    cfg = common.run_config(args, write=info.is_main)
    p = plan(cfg, args.control)
    data = data_dir(cfg.data, args.run_dir)
    if info.is_main:
        prepare_data(cfg.data, data)  # a no-op when the prepare stage already ran
    dist.barrier()
    train_tokens, valid = load_split(data, "train"), torch.from_numpy(load_split(data, "valid").astype("int64"))

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = DiT(cfg.model)
    if args.control:  # the students' starting point: the weights that teach round 1
        state, _ = load_exported(common.teacher_export(args.run_dir, 1), common.teacher_weights(cfg, 1), cfg.model)
        model.load_state_dict(state)
    engine = build_engine(model, cfg.optim, cfg.engine, p.total_steps, info.world_size, **p.engine_kwargs)
    out_dir = args.run_dir / p.name
    ckpt_root = out_dir / "checkpoints"
    engine.load(ckpt_root, expect_model=cfg.model)
    metrics = MetricsWriter(args.run_dir if p.name == "teacher" else out_dir)
    if engine.step == 0:
        metrics.config(cfg)
    log.info("%s: %d parameters, world %d, micro-batch %d x %d accumulation, from step %d of %d", p.name,
             count_parameters(model), info.world_size, engine.micro_batch, engine.grad_accum, engine.step,
             p.total_steps)

    source = MarkovSource(cfg.data.synthetic) if cfg.data.source == "synthetic" else None
    stream = {"it": None, "step": -1}

    def micro_batches(step: int) -> list[torch.Tensor]:
        # batches() is a pure function of the step: (re)start it wherever the loop is.
        if stream["step"] != step - 1 or stream["it"] is None:
            stream["it"] = batches(train_tokens, p.global_batch, info.rank, info.world_size,
                                   cfg.data.seed, start_step=p.data_offset + step)
        _, local = next(stream["it"])
        stream["step"] = step
        return list(local.split(engine.micro_batch))

    def evaluate(step: int) -> dict[str, float]:
        scalars = {"val/nll": validate(engine, valid, cfg, info.rank, info.world_size)}
        sample_scalars, text = sample_report(engine, cfg, source)
        metrics.text(step, "samples", text)
        return {**scalars, **sample_scalars}

    task = Task(micro_batches=micro_batches, loss=lambda e, x0, g: mdlm_loss(e, x0, g, cfg),
                tokens_per_step=p.global_batch * cfg.data.seq_len, samples_per_step=p.global_batch,
                evaluate=evaluate, client_state=lambda: {"data_step": engine.step})
    finished = train(engine, task, cfg.train, cfg, ckpt_root, metrics, p.total_steps, p.noise_seed, desc=p.name)
    if not finished:
        metrics.close()
        return EXIT_PREEMPTED

    raw = engine.consolidated_state_dict()  # collective
    ema = engine.ema_state_dict()
    if info.is_main:
        out = export_weights(out_dir / "export", raw, ema if ema is not None else raw, cfg, step=engine.step,
                             overwrite=True)
        log.info("exported %s to %s", p.name, out)
    metrics.close()
    dist.barrier()
    dist.cleanup()
    return 0


if __name__ == "__main__":
    common.entry(main)
