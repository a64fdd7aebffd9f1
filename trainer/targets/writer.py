"""Writing one shard of a target set: the teacher's examples of the shard's samples, in batches fixed by index."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.method import sdtt
from trainer.targets import shards


def write_shard(out: Path, plan: shards.ShardPlan, shard: int, rank: int, digest: str, denoise: sdtt.Denoiser,
                spec: sdtt.ExampleSpec, x0_of: Callable[[range], torch.Tensor], batch_size: int,
                on_sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write and publish one shard; returns its completion record (shards.ShardWriter.finish).

    The teacher runs on batches of ``batch_size`` consecutive indices from the shard's start
    (``x0_of(indices)`` gives their clean rows on the teacher's device); ``on_sample`` runs after
    each sample is written. Shared with tools/bench.py targets, so the bench times this loop.
    """
    with shards.ShardWriter(out, plan, shard, rank, digest) as writer:
        for batch in plan.batches(shard, batch_size):
            for ex in sdtt.make_examples(denoise, x0_of(batch), list(batch), spec):
                writer.add(ex.index, ex.xt, ex.fields, ex.meta(), ex.stats)
                if on_sample is not None:
                    on_sample()
        return writer.finish()
