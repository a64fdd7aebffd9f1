"""Validation during training: a per-token loss averaged over held-out rows, one loop for every model
(the teacher's and the control's MDLM NLL bound here, the AR model's exact NLL in ar_report.py)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.config import RunConfig
from trainer.method.losses import mdlm_loss
from trainer.runtime import dist
from trainer.runtime.loop import step_generator


def valid_mean(engine, valid: torch.Tensor, cfg: RunConfig, rank: int, world: int,
               loss: Callable[[int, torch.Tensor], torch.Tensor]) -> float:
    """The mean of ``loss(b, x0)`` (nats/token over batch b's rows ``x0``, on the engine's device)
    over ``train.eval_batches`` batches of this rank's share of ``valid``, weighted by rows, in eval
    mode without gradients; a collective mean over ranks."""
    engine.eval()
    n = cfg.engine.global_batch_size // world
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(cfg.train.eval_batches):
            start = (b * world + rank) * n
            x0 = valid[start % len(valid):][:n]
            if len(x0) == 0:
                break
            total += float(loss(b, x0.to(engine.device))) * len(x0)
            count += len(x0)
    engine.train()
    return dist.all_reduce_mean(total / max(count, 1))


def validate(engine, valid: torch.Tensor, cfg: RunConfig, rank: int, world: int) -> float:
    """The validation NLL bound (nats/token), with fixed noise per batch so successive evaluations are
    comparable; a collective over ranks."""
    return valid_mean(engine, valid, cfg, rank, world,
                      lambda b, x0: mdlm_loss(engine, x0, step_generator(cfg.train.seed + 1, b, rank), cfg))
