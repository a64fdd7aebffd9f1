"""SDTT student training for one round, on DeepSpeed ZeRO.

    python -m trainer.jobs.distill --run-dir DIR --round R [--config FILE] [key=value ...]
    torchrun --nproc_per_node N -m trainer.jobs.distill --run-dir DIR --round R ...

* Teacher of round R: ``jobs.common.teacher_export(DIR, R)`` (the pretrained/imported teacher for
  round 1, round R - 1's student after), weight file ``common.teacher_weights(cfg, R)`` (EMA or raw):
  the same rule the targets job uses to make the round's targets.
* Student init, decided once per round and recorded in every checkpoint (``init``):
  - this round has a checkpoint: resume it (weights, optimizer, EMA, RNG, data position);
  - else, unless ``distill.reset_optimizer``, round R - 1's final DeepSpeed checkpoint (weights +
    optimizer + EMA), continuing its step count: the round trains from step S to S + steps_per_round
    (S = (R - 1) steps_per_round when no round was reset), the lr schedule is not warmed up again;
  - else the teacher's weight file, a fresh optimizer and EMA, steps 0 .. steps_per_round.
* Data (``distill.mode``): offline, the round's target set ``DIR/round_R/targets`` streamed with
  WebDataset (trainer/targets/reader.py: manifest checked against this student BEFORE training,
  checksums verified under ``targets.verify``); online, the teacher runs in the loop and makes
  DENSE targets for the same sample indices in the same order, with the same per-sample generators
  (``sdtt.make_examples``), so offline and online students are comparable seed for seed.
  The data position is the step (shard_reader's order): resume is exact by construction.
* Loss: the divergence ``distill.divergence`` between the student's ONE prediction on x_t and the
  targets, mean over the masked positions of a micro-batch (``sdtt.sparse_divergence``).
* Optimiser: the paper's recipe from DistillConfig (lr 6e-5, 500 warmup steps then constant, global
  batch 128, EMA 0.9999, AdamW without weight decay) with ``optim.grad_clip`` and betas.
* Output: checkpoints in ``DIR/round_R/student/checkpoints``; at the end ``distill.json`` (init,
  samples consumed, skipped shards) and the raw + EMA export ``DIR/round_R/student/export``: the next
  round's teacher. Metrics in ``DIR/round_R/student/{tb,metrics.jsonl}`` (a TensorBoard run of its own:
  the pretraining job's ``train/*`` tags would collide at the same steps); with
  ``distill.log_consumed``, every rank's sample indices per step in ``.../student/consumed/``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer.config import ConfigError, RunConfig, round_steps
from trainer.data.prepared import DataError, MarkovSource, data_dir, load_data_info, load_split
from trainer.jobs import common
from trainer.jobs.pretrain import sample_report
from trainer.jobs.targets import RowPicker, targets_dir
from trainer.method import diffusion, sdtt
from trainer.method.sampling import make_denoiser
from trainer.model.dit import DiT, count_parameters
from trainer.runtime import dist
from trainer.runtime.checkpoint import (
    WEIGHT_FILES,
    CheckpointError,
    atomic_write_json,
    export_weights,
    load_exported,
    read_json,
    verify_file,
)
from trainer.runtime.engine import Engine, build_engine
from trainer.runtime.loop import Task, train
from trainer.runtime.metrics import MetricsWriter
from trainer.runtime.preempt import EXIT_PREEMPTED
from trainer.targets import codecs, shards
from trainer.targets import reader as SR
from trainer.targets.codecs import CodecError

log = logging.getLogger("sdtt")

# Test hook: sleep this long per step (a wider window for a test to kill a run between checkpoints).
STEP_DELAY_ENV = "SDTT_DISTILL_STEP_DELAY_S"


class DistillError(RuntimeError):
    """The round cannot run as asked; the message names the file, folder or key."""


def student_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / f"round_{round_idx}" / "student"


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One micro-batch: the samples' indices, x_t [B, L], t [B] and their targets (online: None
    until the teacher fills them in; x0 [B, L] holds the clean rows)."""

    indices: list[int]
    xt: Tensor | None = None
    t: Tensor | None = None
    targets: codecs.Targets | None = None
    x0: Tensor | None = None


def distill_loss(forward: Callable[..., Tensor], batch: Batch, cfg: RunConfig, kind: str) -> Tensor:
    """Mean divergence over the masked positions between the student's one prediction on x_t and
    the targets. ``forward(xt, sigma)`` is the student (the engine, or a plain model in tests)."""
    assert batch.xt is not None and batch.t is not None and batch.targets is not None
    mask_id, eps = cfg.model.vocab_size, cfg.diffusion.noise_eps
    xt = batch.xt
    sigma = diffusion.sigma_of_t(batch.t, eps).to(xt.device) if cfg.model.time_conditioning else None
    # The head runs on the masked positions only, in the targets' row order: [N, V].
    student = diffusion.masked_log_probs(forward(xt, sigma, rows=xt == mask_id), mask_id)
    return sdtt.masked_mean(sdtt.sparse_divergence(student, batch.targets, kind))


def online_targets(denoise: sdtt.Denoiser, batch: Batch, spec: sdtt.ExampleSpec, device: torch.device) -> Batch:
    """Fill in x_t, t and DENSE targets with the teacher: the examples the targets job would write
    for these indices (same generators), uncompressed."""
    assert batch.x0 is not None
    examples = sdtt.make_examples(denoise, batch.x0.to(device), batch.indices, spec)
    xt = torch.from_numpy(np.stack([ex.xt for ex in examples]).astype(np.int64)).to(device)
    t = torch.tensor([ex.t for ex in examples], dtype=torch.float32)
    logp = torch.from_numpy(np.concatenate([ex.fields["logp"] for ex in examples], axis=0)).to(device)
    return dataclasses.replace(batch, xt=xt, t=t, targets=codecs.DenseTargets(logp))


def offline_batch(samples: list[dict[str, Any]], codec: str, k: int, cfg: RunConfig, device: torch.device) -> Batch:
    mask_id = cfg.model.vocab_size
    xt, t, fields = SR.collate_fields(samples, codec, mask_id, cfg.data.seq_len)
    try:
        targets = codecs.decode(fields, codec, mask_id, k, device=device)
    except CodecError as e:
        keys = ", ".join(str(s.get("key")) for s in samples)
        raise shards.ShardError(f"samples {keys}: {e}") from None
    return Batch([int(s["meta"]["index"]) for s in samples], xt.to(device), t, targets)


# --------------------------------------------------------------------------------------------------
# Where the round starts
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Init:
    kind: str  # resume | continue | export
    path: str  # checkpoint root, or the export's weight file
    round_start: int  # the engine step the round starts at
    record: dict  # what the checkpoints and distill.json say about the init

    def describe(self) -> str:
        return {"resume": f"resuming this round's checkpoint in {self.path}",
                "continue": f"round {self.record.get('from_round')}'s checkpoint {self.path} "
                            f"(weights, optimizer, EMA), continuing from step {self.round_start}",
                "export": f"{self.path} with a fresh optimizer"}[self.kind]


def _latest(root: Path) -> tuple[str, dict] | None:
    """(tag, engine_meta) of a checkpoint root's latest checkpoint, or None."""
    if not (root / "latest").is_file():
        return None
    tag = (root / "latest").read_text().strip()
    return tag, read_json(root / tag / "engine_meta.json")


def plan_init(cfg: RunConfig, run_dir: Path, round_idx: int, teacher_file: Path) -> Init:
    ckpt_root = student_dir(run_dir, round_idx) / "checkpoints"
    own = _latest(ckpt_root)
    if own is not None:
        client = read_json(ckpt_root / own[0] / "client_state.json")
        if client.get("round") != round_idx or "round_start" not in client:
            raise DistillError(f"{ckpt_root / own[0] / 'client_state.json'}: not a round-{round_idx} distillation "
                               "checkpoint (no round/round_start)")
        return Init("resume", str(ckpt_root), int(client["round_start"]), dict(client.get("init", {})))
    if round_idx > 1 and not cfg.distill.reset_optimizer:
        prev_root = student_dir(run_dir, round_idx - 1) / "checkpoints"
        prev = _latest(prev_root)
        if prev is not None:
            step = int(prev[1]["step"])
            export = read_json(student_dir(run_dir, round_idx - 1) / "export" / "export.json")
            if int(export["step"]) != step:
                raise DistillError(f"{prev_root}: the latest checkpoint is at step {step} but round {round_idx - 1}'s "
                                   f"export (this round's teacher) is of step {export['step']}; finish round "
                                   f"{round_idx - 1} or set distill.reset_optimizer=true")
            return Init("continue", str(prev_root), step,
                        {"from": "checkpoint", "from_round": round_idx - 1,
                         "path": _rel(prev_root / prev[0], run_dir), "step": step})
        log.warning("round %d: no checkpoint of round %d in %s: starting from the export with a fresh optimizer",
                    round_idx, round_idx - 1, prev_root)
    return Init("export", str(teacher_file), 0, {"from": "export", "path": _rel(teacher_file, run_dir), "step": 0})


def _rel(path: Path, run_dir: Path) -> str:
    """Run-relative where possible: records stay true when a run folder moves."""
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def teacher_file_sha(export_dir: Path, which: str) -> tuple[Path, str]:
    """The teacher weight file of this round and its sha256, verified against export.json."""
    info_path = export_dir / "export.json"
    if not info_path.is_file():
        raise DistillError(f"no teacher export at {export_dir} (export.json missing): round 1 needs the pretrained "
                           "or imported teacher, round r the student export of round r - 1")
    entry = read_json(info_path)["files"].get(WEIGHT_FILES[which])
    if entry is None:
        raise DistillError(f"{info_path}: has no entry for {WEIGHT_FILES[which]}")
    path = export_dir / WEIGHT_FILES[which]
    verify_file(path, entry)
    return path, entry["sha256"]


def expected_manifest(cfg: RunConfig, run_dir: Path, round_idx: int, teacher: Path, which: str, sha: str,
                      data_info: dict[str, Any], data_json: Path) -> SR.Expected:
    g, steps = cfg.targets, round_steps(cfg, round_idx)
    values = {
        "round": round_idx, "seq_len": cfg.data.seq_len, "vocab_size": cfg.model.vocab_size,
        "mask_id": cfg.model.vocab_size, "tokenizer": data_info["tokenizer"], "data_digest": data_info["digest"],
        "codec": g.codec, "k": g.k, "teacher_steps": g.teacher_steps, "student_steps": steps,
        "dt": sdtt.teacher_dt(steps, g.teacher_steps, cfg.diffusion.sampling_eps), "noise_eps": cfg.diffusion.noise_eps,
        "seed": cfg.seed, "num_samples": g.num_samples,
        "teacher": str(teacher.parent.relative_to(run_dir)), "teacher_weights": which, "teacher_sha256": sha,
    }
    why = {"round": "--round", "seq_len": "data.seq_len", "vocab_size": "model.vocab_size",
           "mask_id": "model.vocab_size", "tokenizer": str(data_json), "data_digest": str(data_json),
           "codec": "targets.codec", "k": "targets.k", "teacher_steps": "targets.teacher_steps",
           "student_steps": "distill.start_steps / 2**round", "dt": "distill.start_steps, targets.teacher_steps, "
           "diffusion.sampling_eps", "noise_eps": "diffusion.noise_eps", "seed": "seed",
           "num_samples": "targets.num_samples", "teacher": "the export this round starts from",
           "teacher_weights": "common.teacher_weights: targets.use_ema for round 1, distill.ema_as_teacher after",
           "teacher_sha256": f"sha256 of {teacher}, this round's teacher"}
    return SR.Expected(values, why, cfg.distill.divergence)


# --------------------------------------------------------------------------------------------------
# Consumed-sample log (distill.log_consumed)
# --------------------------------------------------------------------------------------------------
class ConsumedLog:
    """rank-NNNN.jsonl: {"step", "indices", "epochs"} per optimizer step of this rank. On a restart the
    lines of steps at or after the resume point are dropped (their updates were lost with the
    process), so the file always describes the training that counts."""

    def __init__(self, folder: Path, rank: int, resume_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank:04d}.jsonl"
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < resume_step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line of a killed run
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", buffering=1)

    def write(self, step: int, indices: list[int], epochs: list[int]) -> None:
        self._f.write(json.dumps({"step": step, "indices": indices, "epochs": epochs}) + "\n")

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def run(cfg: RunConfig, run_dir: Path, round_idx: int, info: dist.DistInfo) -> int:
    ds = cfg.distill
    if not 1 <= round_idx <= ds.rounds:
        raise DistillError(f"--round {round_idx} is outside 1..distill.rounds={ds.rounds}")
    online = ds.mode == "online"
    which = common.teacher_weights(cfg, round_idx)
    tdir = common.teacher_export(run_dir, round_idx)
    teacher_file, teacher_sha = teacher_file_sha(tdir, which)
    ddir = data_dir(cfg.data, run_dir)
    data_info = load_data_info(ddir)
    sdir = student_dir(run_dir, round_idx)
    ckpt_root = sdir / "checkpoints"

    # ---- the data, checked before anything trains --------------------------------------------
    bad: list[shards.BadShard] = []
    if online:
        per_shard = shards.samples_per_shard(
            cfg.targets.samples_per_shard, cfg.targets.shard_max_bytes,
            shards.max_sample_bytes(cfg.targets.codec, cfg.targets.k, cfg.model.vocab_size, cfg.data.seq_len))
        units = SR.planned_units(shards.ShardPlan(cfg.targets.num_samples, per_shard))
        set_digest, codec, k = "online", "dense", cfg.model.vocab_size
    else:
        tset = targets_dir(run_dir, round_idx)
        manifest = shards.read_manifest(tset)
        SR.check_manifest(manifest, expected_manifest(cfg, run_dir, round_idx, teacher_file, which, teacher_sha,
                                                      data_info, ddir / "data.json"), tset / shards.MANIFEST)
        bad = SR.verify_shards(tset, manifest, cfg.targets.verify)  # collective
        for b in bad:
            log.warning("skipping shard %s: %s (targets.verify=skip)", tset / b.name, b.reason)
        units = SR.units_of(manifest, [b.name for b in bad])
        set_digest = shards.header_digest({k_: v for k_, v in manifest.items() if k_ not in ("shards", "totals")})
        codec, k = manifest["codec"], int(manifest["k"])
    geo = SR.geometry(ds.global_batch_size, info.world_size, info.rank, ds.streams, ds.loader_workers)
    order = SR.SampleOrder(units, geo.streams, cfg.seed, round_idx, resample=ds.resample)

    # ---- the student ----------------------------------------------------------------------------
    # Rank 0 decides (and warns) once; its verdict, or its error, reaches every rank (no rank waits alone).
    planned: tuple[Init | None, str | None] = (None, None)
    if info.is_main:
        try:
            planned = (plan_init(cfg, run_dir, round_idx, teacher_file), None)
        except (DistillError, CheckpointError, KeyError, OSError) as e:
            planned = (None, f"{type(e).__name__}: {e}" if isinstance(e, (KeyError, OSError)) else str(e))
    init, error = dist.broadcast_object(planned)
    if error is not None or init is None:
        raise DistillError(error or "no init plan")
    total = init.round_start + ds.steps_per_round
    torch.manual_seed(cfg.train.seed)  # identical (and then overwritten) initial weights on every rank
    model = DiT(cfg.model)
    if init.kind == "export":
        state, _ = load_exported(tdir, which, expect_model=cfg.model)
        model.load_state_dict(state)
    optim = dataclasses.replace(cfg.optim, weight_decay=ds.weight_decay)
    engine = build_engine(model, optim, cfg.engine, total, info.world_size, lr=ds.lr, warmup_steps=ds.warmup_steps,
                          global_batch_size=ds.global_batch_size, ema_decay=ds.ema, key="distill")
    client: dict[str, Any] = {}
    if init.kind in ("resume", "continue"):
        client = engine.load(init.path, expect_model=cfg.model) or {}
        if init.kind == "continue":
            client = {}  # the previous round's data position means nothing here
            if engine.step != init.round_start:
                raise DistillError(f"{init.path}: loaded step {engine.step}, planned {init.round_start}")
    data_state = client.get("data", {})
    if data_state:
        _check_resume(data_state, geo, ds.resample, set_digest, [b.name for b in bad], ckpt_root)
    start = engine.step - init.round_start
    if data_state and data_state.get("step") != start:
        raise DistillError(f"{ckpt_root}: checkpoint at step {engine.step} records data step {data_state.get('step')}, "
                           f"expected {start} (round starts at {init.round_start})")
    consumed_before = int(data_state.get("samples_consumed", 0))

    metrics = MetricsWriter(sdir)
    if engine.step == init.round_start:
        metrics.config(cfg)
    metrics.scalars(engine.step, {"data/skipped_shards": float(len(bad))})
    log.info("distill round %d (%s, %s targets, %s): student %d parameters from %s; steps %d -> %d of %d (global "
             "batch %d = %d ranks x %d x %d accumulation); teacher %s (%s, %s...); data: %s; skipped shards: %d",
             round_idx, ds.mode, codec, ds.divergence, count_parameters(model), init.describe(), engine.step, total,
             total - init.round_start, ds.global_batch_size, info.world_size, engine.micro_batch, engine.grad_accum,
             tdir, which, teacher_sha[:12], SR.describe(order, geo), len(bad))

    # ---- batches --------------------------------------------------------------------------------
    reader = None if online else SR.RankReader(targets_dir(run_dir, round_idx), order, geo, ds.loader_workers)
    teacher_denoise, spec, train_rows, rows = None, None, None, None
    if online:
        teacher, _ = common.load_model(tdir, which, cfg.model)
        teacher.to(info.device).requires_grad_(False)
        teacher_denoise = make_denoiser(teacher, cfg.model.vocab_size, cfg.diffusion.noise_eps,
                                        cfg.model.time_conditioning)
        steps = round_steps(cfg, round_idx)
        spec = sdtt.ExampleSpec(seed=cfg.seed, round_idx=round_idx,
                                dt=sdtt.teacher_dt(steps, cfg.targets.teacher_steps, cfg.diffusion.sampling_eps),
                                teacher_steps=cfg.targets.teacher_steps, mask_id=cfg.model.vocab_size,
                                noise_eps=cfg.diffusion.noise_eps, train_eps=cfg.diffusion.train_eps,
                                t_min=cfg.diffusion.sampling_eps, codec="dense", k=cfg.model.vocab_size)
        train_rows = load_split(ddir, "train")
        if train_rows.shape[1] != cfg.data.seq_len:
            raise DistillError(f"{ddir}: sequences of length {train_rows.shape[1]}, data.seq_len={cfg.data.seq_len}")
        rows = RowPicker(train_rows.shape[0], cfg.seed, round_idx)
    consumed_log = ConsumedLog(sdir / "consumed", info.rank, engine.step) if ds.log_consumed else None
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    counter = {"samples": 0, "epoch": 0}

    def micro_batches(step: int) -> list[Batch]:
        if delay:
            time.sleep(delay)
        k_ = step - init.round_start
        if reader is not None:
            samples = reader.batch(k_)
            indices = [int(s["meta"]["index"]) for s in samples]
            epochs = [int(s["epoch"]) for s in samples]
        else:
            pairs = order.step_indices(geo, k_)
            indices, epochs = [i for i, _ in pairs], [e for _, e in pairs]
        if consumed_log is not None:
            consumed_log.write(step, indices, epochs)
        counter["samples"] += len(indices)
        counter["epoch"] = max(epochs)
        mb = engine.micro_batch
        if reader is not None:
            return [offline_batch(samples[i:i + mb], codec, k, cfg, engine.device) for i in range(0, len(samples), mb)]
        assert train_rows is not None and rows is not None
        out = []
        for i in range(0, len(indices), mb):
            idx = indices[i:i + mb]
            x0 = torch.from_numpy(np.stack([np.asarray(train_rows[rows(j)], dtype=np.int64) for j in idx]))
            out.append(Batch(idx, x0=x0))
        return out

    def loss(e: Engine, batch: Batch, gen: torch.Generator) -> Tensor:  # noqa: ARG001 (targets hold the noise)
        if batch.targets is None:
            assert teacher_denoise is not None and spec is not None
            batch = online_targets(teacher_denoise, batch, spec, e.device)
        return distill_loss(e, batch, cfg, ds.divergence)

    def consumed_total() -> int:  # collective (every rank saves)
        return consumed_before + round(dist.all_reduce_mean(float(counter["samples"])) * info.world_size)

    def client_state() -> dict:
        return {"round": round_idx, "round_start": init.round_start, "init": init.record,
                "data": {"step": engine.step - init.round_start, "streams": geo.streams,
                         "global_batch": ds.global_batch_size, "resample": ds.resample, "targets": set_digest,
                         "skipped": sorted(b.name for b in bad), "samples_consumed": consumed_total()}}

    source = MarkovSource(cfg.data.synthetic) if cfg.data.source == "synthetic" else None
    eval_cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, steps=round_steps(cfg, round_idx)))

    probe: dict[str, Batch] = {}

    def probe_loss() -> float:
        """The loss on a fixed probe: this rank's first samples of the round (seen in training), the
        same in every run and after any resume. Scored under no_grad BEFORE sampling on purpose: the
        first forward after training re-gathers ZeRO-3's persistent parameters, and inside the
        sampler's inference_mode they would become inference tensors that the next backward refuses
        (measured here; pretrain's validate pass shields its sampling the same way)."""
        if "batch" not in probe:
            if reader is not None:
                _, _, samples = next(iter(SR.TargetStream(reader.root, order, geo, 0)))
                probe["batch"] = offline_batch(samples[:engine.micro_batch], codec, k, cfg, engine.device)
            else:
                assert teacher_denoise is not None and spec is not None and train_rows is not None
                idx = [i for i, _ in order.step_indices(geo, 0)][:engine.micro_batch]
                x0 = torch.from_numpy(np.stack([np.asarray(train_rows[rows(j)], dtype=np.int64) for j in idx]))
                probe["batch"] = online_targets(teacher_denoise, Batch(idx, x0=x0), spec, engine.device)
        engine.eval()
        with torch.no_grad():
            value = float(distill_loss(engine, probe["batch"], cfg, ds.divergence))
        engine.train()
        return dist.all_reduce_mean(value)

    def evaluate(step: int) -> dict[str, float]:
        probe_value = probe_loss()  # first: see its docstring
        scalars, text = sample_report(engine, eval_cfg, source)  # at the round's student step count
        scalars["eval/probe_loss"] = probe_value
        metrics.text(step, "samples", text)
        scalars["data/skipped_shards"] = float(len(bad))
        if not ds.resample:  # (a resampled stream has draws, not epochs)
            scalars["data/epoch"] = float(counter["epoch"])
        return scalars

    task = Task(micro_batches=micro_batches, loss=loss,
                tokens_per_step=ds.global_batch_size * cfg.data.seq_len, samples_per_step=ds.global_batch_size,
                evaluate=evaluate, client_state=client_state)
    seed = int(np.random.SeedSequence([cfg.train.seed, round_idx]).generate_state(1)[0])
    try:
        finished = train(engine, task, cfg.train, cfg, ckpt_root, metrics, total, seed, desc=f"distill r{round_idx}")
    finally:
        if reader is not None:
            reader.close()
        if consumed_log is not None:
            consumed_log.close()
    if not finished:
        metrics.close()
        return EXIT_PREEMPTED

    consumed = consumed_total()
    expected = (engine.step - init.round_start) * ds.global_batch_size
    if consumed != expected:  # by construction; a loud check that the accounting agrees
        raise DistillError(f"consumed {consumed} samples over {engine.step - init.round_start} steps of "
                           f"{ds.global_batch_size}: expected {expected}")
    metrics.scalars(engine.step, {"data/samples_consumed": float(consumed)})
    raw = engine.consolidated_state_dict()  # collective
    ema = engine.ema_state_dict()
    if info.is_main:
        atomic_write_json(sdir / "distill.json", {
            "round": round_idx, "mode": ds.mode, "init": init.record, "round_start": init.round_start,
            "final_step": engine.step, "samples_consumed": consumed, "targets": set_digest,
            "skipped_shards": [[b.name, b.reason] for b in bad], "teacher": _rel(teacher_file, run_dir),
            "teacher_weights": which, "teacher_sha256": teacher_sha, "next_teacher_weights": common.teacher_weights(
                cfg, round_idx + 1)})
        out = export_weights(sdir / "export", raw, ema if ema is not None else raw, cfg, step=engine.step,
                             overwrite=True)
        log.info("round %d: %d samples consumed; exported the student to %s (next round's teacher: its %s weights)",
                 round_idx, consumed, out, common.teacher_weights(cfg, round_idx + 1))
    metrics.close()
    dist.barrier()
    return 0


def _check_resume(data: dict, geo: SR.Geometry, resample: bool, set_digest: str, skipped: list[str],
                  where: Path) -> None:
    """The order a checkpoint's position refers to must be the one this run would read."""
    for key, now in (("streams", geo.streams), ("global_batch", geo.streams * geo.per_stream),
                     ("resample", resample), ("targets", set_digest)):
        if data.get(key) != now:
            hint = " (set distill.streams to the checkpoint's value)" if key == "streams" else ""
            raise DistillError(f"{where}: the checkpoint's data position is for {key}={data.get(key)!r}, this run "
                               f"has {now!r}: the sample order would change{hint}")
    if sorted(data.get("skipped", [])) != sorted(skipped):
        log.warning("%s: skipped shards changed since the checkpoint (%s -> %s): the remaining order differs from an "
                    "uninterrupted run", where, data.get("skipped"), skipped)


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], with_round=True, argv=argv)
    cfg = common.run_config(args)
    info = dist.init_distributed()
    try:
        return run(cfg, args.run_dir, args.round, info)
    except (shards.ShardError, DistillError, ConfigError, DataError, CheckpointError, CodecError) as e:
        print(f"error (rank {info.rank}): {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()


if __name__ == "__main__":
    common.entry(main, DistillError)
