"""The student's micro-batches, complete when returned: offline from a target set, online from the teacher.

Both sources follow the same ``SampleOrder`` (trainer/targets/reader.py): the data position is the
step, so resume is exact by construction, and the online student sees the same sample indices in
the same order, with the same per-sample generators (``sdtt.make_examples``), as an offline student
of the same seed; only its targets are dense. The online teacher runs inside ``batches``, so its time
counts as data time (``train/data_wait_frac``) in both modes.

    source.batches(step) -> list[Batch]   this rank's micro-batches of an optimizer step
    source.probe()       -> Batch         a fixed micro-batch (this rank's first of the round), made once
    source.samples, source.epoch          what this rank has consumed since it started, the last epoch
    source.close()

What the training loop reads (trainer/runtime/loop.py) is a ``RoundStream``: a source plus the
round's checkpoint state (``state(step)``: the round, its init and its data position).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from trainer.config import RunConfig
from trainer.data.rows import RowPicker
from trainer.distill.consumed import ConsumedLog
from trainer.distill.rounds import Init, TeacherRef, data_position
from trainer.layout import RunLayout
from trainer.method import codecs, sdtt
from trainer.method.codecs import CodecError
from trainer.method.losses import sdtt_loss
from trainer.runtime import dist
from trainer.targets import header, reader, shards
from trainer.targets.inputs import load_train_split, teacher_denoiser

log = logging.getLogger("sdtt")


@dataclass
class Batch:
    """One micro-batch: the samples' indices, x_t [B, L], t [B] and their targets (x0 [B, L] holds
    the clean rows of an online batch before the teacher fills in the rest)."""

    indices: list[int]
    xt: Tensor | None = None
    t: Tensor | None = None
    targets: codecs.Targets | None = None
    x0: Tensor | None = None


def distill_loss(forward: Callable[..., Tensor], batch: Batch, cfg: RunConfig, kind: str) -> Tensor:
    """Mean divergence ``kind`` over the masked positions between the student's one prediction on
    x_t and the batch's targets. ``forward(xt, sigma, rows=...)`` is the student (an engine or a model)."""
    assert batch.xt is not None and batch.t is not None and batch.targets is not None
    return sdtt_loss(forward, batch.xt, batch.t, batch.targets, cfg, kind)


def probe_loss(model: Any, batch: Batch, cfg: RunConfig, kind: str) -> float:
    """``distill_loss`` on a fixed batch in eval mode under no_grad, mean over ranks (a collective).
    Score it BEFORE sampling: the first forward after training re-gathers ZeRO-3's persistent
    parameters, and inside the sampler's inference_mode they would become inference tensors that
    the next backward refuses."""
    model.eval()
    with torch.no_grad():
        value = float(distill_loss(model, batch, cfg, kind))
    model.train()
    return dist.all_reduce_mean(value)


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
    """Decoded target-set samples -> one micro-batch (collate + codec decode); a bad sample is a
    ShardError naming the sample keys."""
    mask_id = cfg.model.vocab_size
    xt, t, fields = reader.collate_fields(samples, codec, mask_id, cfg.data.seq_len)
    try:
        targets = codecs.decode(fields, codec, mask_id, k, device=device)
    except CodecError as e:
        keys = ", ".join(str(s.get("key")) for s in samples)
        raise shards.ShardError(f"samples {keys}: {e}") from None
    return Batch([int(s["meta"]["index"]) for s in samples], xt.to(device), t, targets)


@dataclass(frozen=True)
class RoundData:
    """What round r trains on, checked: the order's units, the shards left out, the set's digest
    (``online`` for the online student) and the codec/K of its targets."""

    units: list[reader.Unit]
    bad: list[shards.BadShard]
    digest: str
    codec: str
    k: int


def check_round_data(cfg: RunConfig, layout: RunLayout, round_idx: int, teacher: TeacherRef,
                     data_info: dict[str, Any], data_json: Path) -> RoundData:
    """Before anything trains. Offline: the manifest against this student (``header.check``, naming
    every differing field) and every shard's checksum under ``targets.verify`` (a collective: call on
    every rank). Online: the units the targets job would have written, targets dense."""
    if cfg.distill.mode == "online":
        units = reader.planned_units(shards.plan_for(cfg))
        return RoundData(units, [], "online", "dense", cfg.model.vocab_size)
    tset = layout.targets(round_idx)
    manifest = shards.read_manifest(tset)
    header.check(manifest, header.describe(cfg, round_idx, teacher.id(layout), data_info), tset / shards.MANIFEST,
                 cfg.distill.divergence, header.sources(data_json, teacher.file))
    bad = reader.verify_shards(tset, manifest, cfg.targets.verify)  # collective
    for b in bad:
        log.warning("skipping shard %s: %s (targets.verify=skip)", tset / b.name, b.reason)
    digest = shards.header_digest({k: v for k, v in manifest.items() if k not in ("shards", "totals")})
    return RoundData(reader.units_of(manifest, [b.name for b in bad]), bad, digest, manifest["codec"],
                     int(manifest["k"]))


class BatchSource(Protocol):
    samples: int
    epoch: int

    def batches(self, step: int) -> list[Batch]: ...

    def probe(self) -> Batch: ...

    def close(self) -> None: ...


class _Counted:
    """The bookkeeping both sources share: samples and epoch consumed, the optional consumed log, the
    probe batch (made at the first call, as evaluation first asks for it)."""

    def __init__(self, order: reader.SampleOrder, geo: reader.Geometry, micro_batch: int, round_start: int,
                 consumed: ConsumedLog | None):
        self.order, self.geo, self.micro, self.round_start = order, geo, micro_batch, round_start
        self.consumed = consumed
        self.samples, self.epoch = 0, 0
        self._probe: Batch | None = None

    def probe(self) -> Batch:
        if self._probe is None:
            self._probe = self._first_batch()
        return self._probe

    def _first_batch(self) -> Batch:
        raise NotImplementedError

    def _count(self, step: int, indices: list[int], epochs: list[int]) -> None:
        if self.consumed is not None:
            self.consumed.write(step, indices, epochs)
        self.samples += len(indices)
        self.epoch = max(epochs)

    def close(self) -> None:
        if self.consumed is not None:
            self.consumed.close()


class OfflineBatches(_Counted):
    """Round r's target set, streamed by this rank's ``RankReader`` (WebDataset, DataLoader workers)."""

    def __init__(self, root: Path, order: reader.SampleOrder, geo: reader.Geometry, workers: int, codec: str, k: int,
                 cfg: RunConfig, device: torch.device, micro_batch: int, round_start: int,
                 consumed: ConsumedLog | None = None):
        super().__init__(order, geo, micro_batch, round_start, consumed)
        self.root, self.codec, self.k, self.cfg, self.device = root, codec, k, cfg, device
        self.reader = reader.RankReader(root, order, geo, workers)

    def batches(self, step: int) -> list[Batch]:
        samples = self.reader.batch(step - self.round_start)
        self._count(step, [int(s["meta"]["index"]) for s in samples], [int(s["epoch"]) for s in samples])
        return [self._batch(samples[i:i + self.micro]) for i in range(0, len(samples), self.micro)]

    def _first_batch(self) -> Batch:
        _, _, samples = next(iter(reader.TargetStream(self.root, self.order, self.geo, 0)))
        return self._batch(samples[:self.micro])

    def _batch(self, samples: list[dict[str, Any]]) -> Batch:
        return offline_batch(samples, self.codec, self.k, self.cfg, self.device)

    def close(self) -> None:
        self.reader.close()
        super().close()


class OnlineBatches(_Counted):
    """The teacher in the loop: clean rows picked as the targets job picks them (``RowPicker``),
    DENSE targets made on the fly for the same sample indices."""

    def __init__(self, denoise: sdtt.Denoiser, spec: sdtt.ExampleSpec, rows: np.ndarray, picker: RowPicker,
                 order: reader.SampleOrder, geo: reader.Geometry, device: torch.device, micro_batch: int,
                 round_start: int, consumed: ConsumedLog | None = None):
        super().__init__(order, geo, micro_batch, round_start, consumed)
        self.denoise, self.spec, self.rows, self.picker, self.device = denoise, spec, rows, picker, device

    def batches(self, step: int) -> list[Batch]:
        pairs = self.order.step_indices(self.geo, step - self.round_start)
        indices, epochs = [i for i, _ in pairs], [e for _, e in pairs]
        self._count(step, indices, epochs)
        return [self._batch(indices[i:i + self.micro]) for i in range(0, len(indices), self.micro)]

    def _first_batch(self) -> Batch:
        return self._batch([i for i, _ in self.order.step_indices(self.geo, 0)][:self.micro])

    def _batch(self, idx: list[int]) -> Batch:
        x0 = torch.from_numpy(np.stack([np.asarray(self.rows[self.picker(j)], dtype=np.int64) for j in idx]))
        return online_targets(self.denoise, Batch(idx, x0=x0), self.spec, self.device)


def round_source(cfg: RunConfig, layout: RunLayout, round_idx: int, teacher: TeacherRef, rd: RoundData,
                 order: reader.SampleOrder, geo: reader.Geometry, device: torch.device, micro_batch: int,
                 round_start: int, consumed: ConsumedLog | None) -> BatchSource:
    """The round's micro-batches by ``distill.mode``: offline from its target set, or online from the
    teacher (DENSE targets for the same samples in the same order)."""
    dcfg = cfg.distill
    if dcfg.mode == "online":  # the targets job's inputs (trainer/targets/inputs.py), its checks included
        denoise = teacher_denoiser(teacher, cfg, device)
        _, rows = load_train_split(cfg, layout.root)
        spec = header.example_spec(cfg, round_idx, codec="dense", k=cfg.model.vocab_size)
        source = OnlineBatches(denoise, spec, rows, RowPicker(rows.shape[0], cfg.seed, round_idx), order, geo, device,
                               micro_batch, round_start, consumed)
    else:
        source = OfflineBatches(layout.targets(round_idx), order, geo, dcfg.loader_workers, rd.codec, rd.k, cfg,
                                device, micro_batch, round_start, consumed)
    return source


class RoundStream:
    """What the training loop reads of a round: the source's micro-batches, and in every checkpoint
    the round, its init and its data position (``rounds.data_position``, checked by
    ``check_resume`` of trainer/distill/rounds.py on restart). ``delay_s``: a test hook, a sleep per step."""

    def __init__(self, source: BatchSource, cfg: RunConfig, round_idx: int, init: Init, rd: RoundData, streams: int,
                 consumed_before: int, world_size: int, delay_s: float = 0.0):
        self.source, self.cfg, self.round_idx, self.init, self.rd = source, cfg, round_idx, init, rd
        self.streams, self.consumed_before, self.world_size = streams, consumed_before, world_size
        self.delay_s = delay_s

    def batches(self, step: int) -> list[Batch]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.source.batches(step)

    def consumed_total(self) -> int:
        """Samples consumed by all ranks in this round, the run's earlier attempts included (a collective)."""
        return self.consumed_before + round(dist.all_reduce_mean(float(self.source.samples)) * self.world_size)

    def state(self, step: int) -> dict[str, Any]:  # a collective (every rank saves)
        return {"round": self.round_idx, "round_start": self.init.round_start, "init": self.init.record,
                "data": data_position(self.cfg, step - self.init.round_start, self.streams, self.rd.digest,
                                      self.rd.bad, self.consumed_total())}

    def close(self) -> None:
        self.source.close()
