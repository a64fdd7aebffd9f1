"""The teacher's (and the control's) validation during training: the MDLM NLL bound on held-out data."""
from __future__ import annotations

import torch

from trainer.config import RunConfig
from trainer.method.losses import mdlm_loss
from trainer.runtime import dist
from trainer.runtime.loop import step_generator


def validate(engine, valid: torch.Tensor, cfg: RunConfig, rank: int, world: int) -> float:
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
            total += float(mdlm_loss(engine, x0.to(engine.device), gen, cfg)) * len(x0)
            count += len(x0)
    engine.train()
    return dist.all_reduce_mean(total / max(count, 1))
