"""The training loop shared by pretraining and distillation.

It owns the cadence (log, evaluate, checkpoint), resumption, preemption and throughput accounting;
the job supplies what differs (a ``Task``): the batch source, which also names the data position
saved in every checkpoint, the loss and the evaluation. Randomness per step comes from a generator
seeded by (seed, step, rank) and the data position is the step, so a resumed run draws and reads
exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.config import RunConfig, TrainConfig
from trainer.runtime import dist
from trainer.runtime.engine import Engine
from trainer.runtime.metrics import DataWaitTimer, GpuStats, MetricsWriter, Throughput
from trainer.runtime.preempt import StopFlag

log = logging.getLogger("sdtt")


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator for one rank's randomness at one step, independent of everything before it."""
    entropy = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(entropy[0] >> np.uint64(1)))


class StepSource(Protocol):
    """Where a job's micro-batches come from: pretraining's ``PretrainBatches`` (trainer/data/stream.py),
    distillation's ``RoundStream`` (trainer/distill/batches.py)."""

    def batches(self, step: int) -> list[Any]:
        """This rank's grad_accum micro-batches of optimizer step ``step`` (a function of the step)."""
        ...

    def state(self, step: int) -> dict[str, Any]:
        """The JSON state saved with the checkpoint after ``step`` optimizer steps: what a restart
        needs to check and locate the stream (may be a collective: every rank calls it)."""
        ...


@dataclass
class Task:
    """What a job plugs into the loop."""

    source: StepSource
    loss: Callable[[Engine, Any, torch.Generator], torch.Tensor]  # (forward, micro-batch, step generator) -> mean loss
    tokens_per_step: int  # global tokens per optimizer step (throughput)
    samples_per_step: int
    evaluate: Callable[[int], dict[str, float]] | None = None  # collective; scalars for TensorBoard


def train(engine: Engine, task: Task, train_cfg: TrainConfig, cfg: RunConfig, ckpt_root: Path,
          metrics: MetricsWriter, total_steps: int, seed: int, desc: str = "train") -> bool:
    """Run from ``engine.step`` to ``total_steps``. Returns True when finished, False when stopped by
    a preemption signal (after a checkpoint that a restart resumes from)."""
    stop = StopFlag()
    rank = dist.get_rank()
    tput, wait = Throughput(), DataWaitTimer()
    gpu = GpuStats(sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()), dist.get_world_size())
    bar = tqdm(total=total_steps, initial=engine.step, desc=desc, disable=not dist.is_main(), dynamic_ncols=True)
    last_saved = start = engine.step
    while engine.step < total_steps:
        step = engine.step
        gen = step_generator(seed, step, rank)
        with wait.waiting():
            micro = task.source.batches(step)
        stats = engine.train_step(lambda e, mb: task.loss(e, mb, gen), micro)  # noqa: B023 (called within this step)
        tput.add(task.samples_per_step, task.tokens_per_step)
        bar.update(1)
        done = engine.step
        if done % train_cfg.log_every == 0 or done == total_steps:
            rates = tput.rates()
            scalars = {"train/loss": stats["loss"], "train/lr": stats["lr"], "train/grad_norm": stats["grad_norm"],
                       "train/tokens_per_s": rates["tokens_per_s"], "train/data_wait_frac": wait.fraction(),
                       **gpu.scalars(rates["tokens_per_s"])}
            metrics.scalars(done, scalars)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
        if task.evaluate is not None and (done % train_cfg.eval_every == 0 or done == total_steps):
            t0 = time.perf_counter()
            scalars = task.evaluate(done)
            metrics.scalars(done, scalars)
            log.info("step %d: %s (%.1fs)", done, ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()),
                     time.perf_counter() - t0)
            tput.reset()  # evaluation time is not training throughput
            wait.reset()
        if done % train_cfg.ckpt_every == 0 or done == total_steps:
            engine.save(ckpt_root, f"step_{done:08d}", task.source.state(done), config=cfg,
                        keep=train_cfg.keep_checkpoints)
            last_saved = done
        if stop.should_stop() or (train_cfg.stop_after and done - start >= train_cfg.stop_after):
            if last_saved != done:
                engine.save(ckpt_root, f"step_{done:08d}", task.source.state(done), config=cfg,
                            keep=train_cfg.keep_checkpoints)
            why = f"signal {stop.received}" if stop.received else f"train.stop_after={train_cfg.stop_after}"
            log.warning("stopping at step %d (%s): checkpoint saved, a restart resumes here", done, why)
            bar.close()
            return False
    bar.close()
    metrics.flush()
    return True
