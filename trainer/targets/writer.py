"""Writing a target set: claiming its folder (``claim_set``, a collective) and writing one shard: the teacher's
examples of the shard's samples, in batches fixed by index."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.errors import StageError
from trainer.fileio import writing
from trainer.method import sdtt
from trainer.runtime import dist
from trainer.targets import shards

log = logging.getLogger("sdtt")


def write_shard(out: Path, plan: shards.ShardPlan, shard: int, rank: int, digest: str, denoise: sdtt.Denoiser,
                spec: sdtt.ExampleSpec, x0_of: Callable[[range], torch.Tensor], batch_size: int,
                on_sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write and publish one shard; returns its completion record (shards.ShardWriter.finish).

    The teacher runs on batches of ``batch_size`` consecutive indices from the shard's start
    (``x0_of(indices)`` gives their clean rows on the teacher's device); ``on_sample`` runs after
    each sample is written. Shared with tools/bench.py targets, so the bench times this loop.
    """
    # A full disk: DiskFull naming the shard; the writer has removed its temporary file by then.
    with writing(out / plan.shard_name(rank, shard)), shards.ShardWriter(out, plan, shard, rank, digest) as writer:
        for batch in plan.batches(shard, batch_size):
            for ex in sdtt.make_examples(denoise, x0_of(batch), list(batch), spec):
                writer.add(ex.index, ex.xt, ex.fields, ex.meta(), ex.stats)
                if on_sample is not None:
                    on_sample()
        return writer.finish()


def claim_set(out: Path, head: dict[str, Any], digest: str, rank: int, is_main: bool) -> None:
    """Claim ``out`` for the set with this header: a collective.

    Rank 0 alone cleans up and claims the folder; its verdict is broadcast (which is also the
    barrier), so a refusal stops every rank instead of leaving the others waiting.
    """
    error = None
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            for p in shards.remove_temporaries(out):
                log.info("removed leftover %s", p.name)
            shards.start_set(out, head)
        except (shards.ShardError, OSError) as e:
            error = str(e)
    error, digest0 = dist.broadcast_object((error, digest))
    if error:
        raise shards.ShardError(error)
    if digest0 != digest:  # every rank must be producing the same set (same config, teacher, data)
        raise StageError(f"rank {rank} computed another target-set header than rank 0 "
                         "(different config, teacher or data on this node?)")
