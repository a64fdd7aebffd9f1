"""Offline SDTT targets for one round: ``python -m trainer.jobs.targets --run-dir DIR --round R
[--config FILE] [key=value ...]``, or the same under ``torchrun --nproc_per_node N`` / srun.

* Config: ``--config`` if given, else ``DIR/config.yaml`` (the run's resolved config), then the
  key=value overrides (trainer/jobs/common.py, as every job).
* Data: the prepared train split (``data.cache_dir`` or ``DIR/data``; trainer/data/prepared.py). The job does
  not prepare data: a missing folder is an error naming it.
* Teacher: round 1 -> ``DIR/teacher/export``; round r > 1 -> ``DIR/round_{r-1}/student/export``;
  the weights named by ``common.teacher_weights`` (trainer.runtime.checkpoint.load_exported, verified).
* Step size: the round-r student samples with N_r = distill.start_steps / 2**r steps
  (config.round_steps); its one step replaces the teacher's m = targets.teacher_steps steps, so

      dt_r = (1 - diffusion.sampling_eps) / (m * N_r)        (sdtt.teacher_dt)

  With m = 2 that is the teacher's own grid spacing, (1 - sampling_eps) / N_{r-1}: round 1 of the
  paper (start 1024) has the 1024-step teacher step dt = (1 - eps)/1024 and the student learn
  1/512; dt doubles every round.
* Samples: i = 0 .. targets.num_samples - 1. Sample i denoises train row perm_e[i mod N] with
  e = i // N (N train rows) and perm_e a permutation seeded by (seed, round, e): every row once per
  pass, in an order that differs between rounds. t, the mask and the teacher's noise come from the
  generator of (seed, round, i) (sdtt.make_examples).
* Sharding: shard j = samples [j S, (j + 1) S); rank r writes shards r, r + W, ...; the teacher runs
  on batches of targets.batch_size consecutive indices from each shard's start, so the batch
  composition is fixed by index (batched matmuls differ in the last bit with the batch) and a
  sample's content is the same for any number of ranks (``write_shard``). Complete shards of an interrupted run
  are skipped, incomplete ones redone; rank 0 writes manifest.json after a barrier.
Output: ``DIR/round_R/targets/`` (trainer/targets/shards.py). Progress on rank 0 (tqdm), samples/s and
MB/s in the log and TensorBoard (``targets/...`` tags, step = samples written).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.config import RunConfig, round_steps
from trainer.data.prepared import data_dir, load_data_info, load_split
from trainer.jobs import common
from trainer.jobs.common import log
from trainer.method import sdtt
from trainer.method.sampling import make_denoiser
from trainer.model.dit import DiT
from trainer.runtime import dist
from trainer.runtime.checkpoint import WEIGHT_FILES, load_exported, read_json
from trainer.runtime.metrics import MetricsWriter
from trainer.targets import shards

# Test hook (fault injection): SIGKILL this process after it has written this many samples, so a
# test can kill a real run in the middle of a shard at a reproducible point.
KILL_AFTER_ENV = "SDTT_TARGETS_KILL_AFTER"
PERM_DOMAIN = 0x5D78


class TargetsError(RuntimeError):
    """The job cannot run as asked; the message names the file, folder or key."""


# --------------------------------------------------------------------------------------------------
# Pieces (pure or nearly, for tests)
# --------------------------------------------------------------------------------------------------
def teacher_dir(run_dir: Path, round_idx: int) -> Path:
    """Round 1 distils the pretrained/imported teacher; round r the student of round r - 1."""
    return common.teacher_export(run_dir, round_idx)


def targets_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / f"round_{round_idx}" / "targets"


class RowPicker:
    """Sample i -> train row perm_e[i mod N], e = i // N, perm_e seeded by (seed, round, e)."""

    def __init__(self, num_rows: int, seed: int, round_idx: int):
        self.n, self.seed, self.round_idx = num_rows, seed, round_idx
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, index: int) -> int:
        epoch = index // self.n
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 2:
                self._perms.clear()
            ss = np.random.SeedSequence([PERM_DOMAIN, self.seed, self.round_idx, epoch])
            perm = self._perms[epoch] = np.random.default_rng(ss).permutation(self.n)
        return int(perm[index % self.n])


def build_header(cfg: RunConfig, round_idx: int, *, teacher: str, which: str, teacher_sha: str,
                 data_info: dict[str, Any], spec: sdtt.ExampleSpec, student_steps: int,
                 per_shard: int, prefix: str) -> dict[str, Any]:
    """What produced the set: plan.json, and the manifest's header (a reader checks these)."""
    return {
        "format": shards.FORMAT,
        "teacher": teacher,  # relative to the run folder
        "teacher_weights": which,
        "teacher_sha256": teacher_sha,
        "data_digest": data_info["digest"],
        "tokenizer": data_info["tokenizer"],
        "seed": spec.seed,
        "round": round_idx,
        "student_steps": student_steps,
        "teacher_steps": spec.teacher_steps,
        "dt": spec.dt,
        "t_min": spec.t_min,
        "noise_eps": spec.noise_eps,
        "train_eps": spec.train_eps,
        "codec": spec.codec,
        "k": spec.k,
        "seq_len": cfg.data.seq_len,
        "vocab_size": cfg.model.vocab_size,
        "mask_id": spec.mask_id,
        "num_samples": cfg.targets.num_samples,
        "samples_per_shard": per_shard,
        "batch_size": cfg.targets.batch_size,
        "prefix": prefix,
        "rows": "train[perm(seed, round, i // N)[i % N]]",
    }


def load_teacher(cfg: RunConfig, tdir: Path, device: torch.device, round_idx: int
                 ) -> tuple[torch.nn.Module, str, str]:
    which = common.teacher_weights(cfg, round_idx)
    if not (tdir / "export.json").is_file():
        raise TargetsError(f"no teacher export at {tdir} (export.json missing): round 1 needs the "
                           "pretrained or imported teacher, round r the student export of round r - 1")
    state, _ = load_exported(tdir, which=which, expect_model=cfg.model)
    model = DiT(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TargetsError(f"{tdir / WEIGHT_FILES[which]}: does not fit the model: {e}") from None
    # The export's verified sha256 of the weight file we loaded (no second pass over a large file).
    sha = read_json(tdir / "export.json")["files"][WEIGHT_FILES[which]]["sha256"]
    return model.eval().to(device), which, sha


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def run(cfg: RunConfig, run_dir: Path, round_idx: int, info: dist.DistInfo) -> dict[str, Any] | None:
    g = cfg.targets
    if not 1 <= round_idx <= cfg.distill.rounds:
        raise TargetsError(f"--round {round_idx} is outside 1..distill.rounds={cfg.distill.rounds}")
    sdtt.check_pairing(g.codec, cfg.distill.divergence)

    ddir = data_dir(cfg.data, run_dir)
    if not (ddir / "data.json").is_file():
        raise TargetsError(f"no prepared data at {ddir} (data.json missing): run "
                           f"python -m trainer.jobs.prepare --run-dir {run_dir} first")
    data_info = load_data_info(ddir)
    train = load_split(ddir, "train")
    if train.shape[1] != cfg.data.seq_len:
        raise TargetsError(f"{ddir}: sequences of length {train.shape[1]}, data.seq_len={cfg.data.seq_len}")
    if data_info["vocab_size"] > cfg.model.vocab_size:
        raise TargetsError(f"{ddir}: vocabulary {data_info['vocab_size']} > model.vocab_size={cfg.model.vocab_size}")

    tdir = teacher_dir(run_dir, round_idx)
    model, which, teacher_sha = load_teacher(cfg, tdir, info.device, round_idx)
    denoise = make_denoiser(model, cfg.model.vocab_size, cfg.diffusion.noise_eps, cfg.model.time_conditioning)

    student_steps = round_steps(cfg, round_idx)
    spec = sdtt.ExampleSpec(
        seed=cfg.seed, round_idx=round_idx,
        dt=sdtt.teacher_dt(student_steps, g.teacher_steps, cfg.diffusion.sampling_eps),
        teacher_steps=g.teacher_steps, mask_id=cfg.model.vocab_size, noise_eps=cfg.diffusion.noise_eps,
        train_eps=cfg.diffusion.train_eps, t_min=cfg.diffusion.sampling_eps, codec=g.codec, k=g.k)
    per_shard = shards.samples_per_shard(
        g.samples_per_shard, g.shard_max_bytes,
        shards.max_sample_bytes(g.codec, g.k, cfg.model.vocab_size, cfg.data.seq_len))
    plan = shards.ShardPlan(g.num_samples, per_shard)
    header = build_header(cfg, round_idx, teacher=str(tdir.relative_to(run_dir)), which=which,
                          teacher_sha=teacher_sha, data_info=data_info, spec=spec, student_steps=student_steps,
                          per_shard=per_shard, prefix=plan.prefix)
    digest = shards.header_digest(header)
    out = targets_dir(run_dir, round_idx)

    # Rank 0 alone cleans up and claims the folder; its verdict is broadcast (which is also the
    # barrier), so a refusal stops every rank instead of leaving the others waiting.
    error = None
    if info.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            for p in shards.remove_temporaries(out):
                log.info("removed leftover %s", p.name)
            shards.start_set(out, header)
        except (shards.ShardError, OSError) as e:
            error = str(e)
    error, digest0 = dist.broadcast_object((error, digest))
    if error:
        raise shards.ShardError(error)
    if digest0 != digest:  # every rank must be producing the same set (same config, teacher, data)
        raise TargetsError(f"rank {info.rank} computed another target-set header than rank 0 "
                           "(different config, teacher or data on this node?)")

    mine = plan.owned(info.rank, info.world_size)
    todo = [j for j in mine if shards.completed(out, j, digest) is None]
    todo_samples = sum(len(plan.indices(j)) for j in todo)
    log.info(f"targets: round {round_idx}, {g.num_samples} samples in {plan.num_shards} shards of {per_shard}; "
             f"student {student_steps} steps, teacher m={g.teacher_steps} steps of dt={spec.dt:.6g}; codec "
             f"{g.codec} K={g.k}; {info.world_size} rank(s); rank 0: {len(mine) - len(todo)} shard(s) already "
             f"complete, {len(todo)} to write")

    metrics = MetricsWriter(run_dir, enabled=info.is_main)
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
            rec = write_shard(out, plan, j, info.rank, digest, denoise, spec, x0_of, g.batch_size, on_sample)
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
            manifest = shards.write_manifest(out, header, plan)
            total = manifest["totals"]
            metrics.scalars(g.num_samples, {f"{tag}/bytes_per_position": total["bytes_per_position"],
                                            f"{tag}/payload_bytes_per_position": total["payload_bytes_per_position"]})
            log.info("\n".join(shards.summarize(out)))
        dist.barrier()
        return manifest
    finally:
        metrics.close()


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


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.split("\n")[0], with_round=True, argv=argv)
    common.setup_logging()
    cfg = common.run_config(args)
    info = dist.init_distributed()
    try:
        run(cfg, args.run_dir, args.round, info)
    except (shards.ShardError, TargetsError, ValueError) as e:
        print(f"error (rank {info.rank}): {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    common.entry(main, TargetsError)
