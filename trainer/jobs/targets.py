"""Offline SDTT targets for one round: ``python -m trainer.jobs.targets --run-dir DIR --round R
[--config FILE] [key=value ...]``, or the same under ``torchrun --nproc_per_node N`` / srun.

Writes ``DIR/round_R/targets/`` from the prepared train split and round R's teacher
(trainer/targets/inputs.py). Sample i's clean row and noise depend only on (seed, round, i) and shard
j is written by rank j mod W in teacher batches fixed by index (trainer/targets/writer.py), so the set
is the same for any number of ranks. Complete shards of an interrupted run are skipped, incomplete
ones redone; rank 0 writes manifest.json last. The contract: docs/DESIGN.md. Progress: tqdm on rank 0,
samples/s and MB/s in the log and TensorBoard (``targets/...`` tags, step = samples written).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.config import RunConfig, round_steps
from trainer.data.rows import RowPicker
from trainer.distill.rounds import round_teacher
from trainer.errors import StageError
from trainer.jobs import common
from trainer.jobs.common import log
from trainer.layout import RunLayout
from trainer.method import divergences
from trainer.runtime import dist
from trainer.runtime.metrics import MetricsWriter
from trainer.targets import header, shards
from trainer.targets.inputs import load_train_split, teacher_denoiser
from trainer.targets.writer import claim_set, write_shard

# Test hook (fault injection): SIGKILL this process after it has written this many samples, so a
# test can kill a real run in the middle of a shard at a reproducible point.
KILL_AFTER_ENV = "SDTT_TARGETS_KILL_AFTER"


def run(cfg: RunConfig, layout: RunLayout, round_idx: int, info: dist.DistInfo) -> dict[str, Any] | None:
    tcfg = cfg.targets
    if not 1 <= round_idx <= cfg.distill.rounds:
        raise StageError(f"--round {round_idx} is outside 1..distill.rounds={cfg.distill.rounds}")
    divergences.check_pairing(tcfg.codec, cfg.distill.divergence)

    # ---- build the data ---------------------------------------------------------------------------
    data_info, train = load_train_split(cfg, layout.root)

    # ---- build the teacher ------------------------------------------------------------------------
    teacher = round_teacher(layout, cfg, round_idx)
    denoise = teacher_denoiser(teacher, cfg, info.device)

    # ---- plan the set: its header, shards and digest ---------------------------------------------------
    spec = header.example_spec(cfg, round_idx)
    student_steps = round_steps(cfg, round_idx)
    plan = shards.plan_for(cfg)
    per_shard = plan.samples_per_shard
    head = header.describe(cfg, round_idx, teacher.id(layout), data_info) | header.sharding(cfg, per_shard, plan.prefix)
    digest = shards.header_digest(head)
    out = layout.targets(round_idx)

    # ---- claim the folder, then find this rank's shards still to write ----------------------------
    claim_set(out, head, digest, info.rank, info.is_main)

    mine = plan.owned(info.rank, info.world_size)
    todo = [j for j in mine if shards.completed(out, j, digest) is None]
    todo_samples = sum(len(plan.indices(j)) for j in todo)
    log.info(f"targets: round {round_idx}, {tcfg.num_samples} samples in {plan.num_shards} shards of {per_shard}; "
             f"student {student_steps} steps, teacher m={tcfg.teacher_steps} steps of dt={spec.dt:.6g}; codec "
             f"{tcfg.codec} K={tcfg.k}; {info.world_size} rank(s); rank 0: {len(mine) - len(todo)} shard(s) already "
             f"complete, {len(todo)} to write")

    # ---- write the shards, then the manifest -------------------------------------------------------
    metrics = MetricsWriter(layout.metrics(0), enabled=info.is_main)
    tag = f"targets/round_{round_idx}"
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    rows = RowPicker(train.shape[0], cfg.seed, round_idx)
    written, bytes_written, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=todo_samples, desc=f"targets round {round_idx}", unit="sample", disable=not info.is_main)
    def x0_of(batch: range) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(train[rows(i)], dtype=np.int64) for i in batch])).to(info.device)

    def on_sample() -> None:  # after each sample written
        nonlocal written
        written += 1
        bar.update(1)
        if kill_after and written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        for j in todo:
            t_shard = time.perf_counter()
            rec = write_shard(out, plan, j, info.rank, digest, denoise, spec, x0_of, tcfg.batch_size, on_sample)
            bytes_written += rec["bytes"]
            dt_shard = max(time.perf_counter() - t_shard, 1e-9)
            rate = {f"{tag}/samples_per_s": rec["samples"] / dt_shard,  # tag: one curve per round
                    f"{tag}/mb_per_s": rec["bytes"] / 1e6 / dt_shard}
            metrics.scalars(written, rate)
            bar.set_postfix(samples_s=f"{rate[f'{tag}/samples_per_s']:.1f}", mb_s=f"{rate[f'{tag}/mb_per_s']:.2f}")
        bar.close()
        elapsed = max(time.perf_counter() - t0, 1e-9)
        log.info(f"targets: rank {info.rank} wrote {written} samples in {len(todo)} shard(s), "
                 f"{bytes_written / 1e6:.2f} MB in {elapsed:.1f} s ({written / elapsed:.1f} samples/s, "
                 f"{bytes_written / 1e6 / elapsed:.2f} MB/s)")
        dist.barrier()
        manifest = None
        if info.is_main:
            manifest = shards.write_manifest(out, head, plan)
            total = manifest["totals"]
            metrics.scalars(tcfg.num_samples, {
                f"{tag}/bytes_per_position": total["bytes_per_position"],
                f"{tag}/payload_bytes_per_position": total["payload_bytes_per_position"]})
            log.info("\n".join(shards.summarize(out)))
        dist.barrier()
        return manifest
    finally:
        metrics.close()


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.split("\n")[0], with_round=True, argv=argv)
    common.setup_logging()
    cfg = common.run_config(args)
    info = dist.init_distributed(cfg.engine.collective_timeout_s)
    try:
        run(cfg, RunLayout(args.run_dir), args.round, info)
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    common.entry(main)
