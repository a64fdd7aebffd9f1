"""Stream a round's target set to the student: checked, verified, in an exact and resumable order.

Three things happen before the first step, on every rank:

* ``trainer.targets.header.check``: the set's manifest against what the student expects (round,
  sequence length, vocabulary, tokenizer, data, codec/K and its pairing with the divergence, teacher
  steps, and the teacher digest: the sha256 of the weight file the targets were made from must be the
  one this round starts from). A mismatch is refused naming the manifest field and both values.
* ``verify_shards``: every shard's size and sha256 against the manifest, the work split over ranks
  and the verdicts gathered, so every rank knows the same bad shards. ``targets.verify=fail``
  refuses a bad shard by name; ``skip`` drops it from the order and reports the count.
* ``SampleOrder``: where every sample goes. The order is a pure function of (seed, round, epoch),
  the shard sizes, the number of streams P and the per-step batch G, never of timing:

    epoch e:   the usable shards in a permutation seeded by (seed, round, e), concatenated
               (samples in shard order: a shard's samples are already i.i.d. draws, the targets
               job picks their rows by a permutation), then cut into P contiguous parts;
    stream p:  part p of epoch 0, then part p of epoch 1, ...  (with ``resample``: whole shards
               drawn uniformly with replacement from a generator seeded by (seed, round, p));
    step k:    c = G / P samples from every stream, positions [k c, (k + 1) c); the global batch is
               stream 0's chunk, then stream 1's, ...; rank r owns streams [r P/W, (r + 1) P/W).

  So the data position is the step alone: a restart at step k reads exactly what an uninterrupted
  run reads at k, no sample is used twice or skipped, and every sample is used once per epoch of
  its stream (P | N and G | N make the epochs line up across streams). Each stream reads a
  contiguous run of whole shards (two partial at its ends), so a rank reads about 1/W of the set.

``TargetStream`` (a torch IterableDataset, one DataLoader worker per subset of the rank's streams)
reads the shards with a WebDataset pipeline (tar -> samples -> slice -> npy/json decode; never
pickle) and yields ``(step, stream, samples)``; ``RankReader`` turns those into this rank's samples
of a step, checking that items arrive in order. The DataLoader yields worker 0's item, worker 1's,
... in turn, so worker w taking the rank's streams w, w + n, ... keeps (step, stream) order.
"""
from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer import fileio
from trainer.config import ConfigError, VerifyPolicy, choice_names
from trainer.method import codecs
from trainer.runtime import dist
from trainer.targets import shards
from trainer.targets.shards import BadShard, ShardError

ORDER_DOMAIN = 0x5D79  # separates the order's seeds from every other use of (seed, round, ...)


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------
def _check_shard(root: Path, entry: Mapping[str, Any]) -> BadShard | None:
    reason = fileio.verify_file(root / entry["name"], entry)
    return None if reason is None else BadShard(entry["name"], reason)


def verify_shards(root: str | Path, manifest: Mapping[str, Any], policy: str) -> list[BadShard]:
    """Check every listed shard (rank r hashes shards r, r + W, ...; a collective: call on every
    rank). ``fail``: raise naming the bad shard(s); ``skip``: return them (sorted by name)."""
    allowed = choice_names(VerifyPolicy)
    if policy not in allowed:
        raise ConfigError(f"bad config key 'targets.verify': '{policy}' is not one of {', '.join(allowed)}")
    root = Path(root)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [b for e in manifest["shards"][rank::world] if (b := _check_shard(root, e)) is not None]
    bad = sorted({b for part in dist.all_gather_object(mine) for b in part})
    if bad and policy == "fail":
        listed = "; ".join(f"{root / b.name}: {b.reason}" for b in bad)
        raise ShardError(f"{len(bad)} bad shard(s) (targets.verify=fail; use skip to train on the rest): {listed}")
    if len(bad) == len(manifest["shards"]):
        raise ShardError(f"{root}: every shard is bad ({bad[0].name}: {bad[0].reason}, ...)")
    return bad


# --------------------------------------------------------------------------------------------------
# The order
# --------------------------------------------------------------------------------------------------
class Unit(NamedTuple):
    """A shard as the order sees it: its file (empty when online), first sample index, size."""

    name: str
    first: int
    samples: int


def units_of(manifest: Mapping[str, Any], skip: Sequence[str] = ()) -> list[Unit]:
    """The manifest's shards in shard order, without the skipped ones."""
    drop = set(skip)
    return [Unit(s["name"], int(s["first"]), int(s["samples"])) for s in manifest["shards"] if s["name"] not in drop]


def planned_units(plan: shards.ShardPlan) -> list[Unit]:
    """The shards the targets job would write (online mode: same indices in the same order)."""
    return [Unit("", plan.indices(j).start, len(plan.indices(j))) for j in range(plan.num_shards)]


class Segment(NamedTuple):
    unit: int  # position in the unit list
    start: int  # first sample offset in the shard
    stop: int  # one past the last
    epoch: int  # epoch (resample: the draw number)


@dataclass(frozen=True)
class Geometry:
    streams: int  # P
    per_stream: int  # c = G / P: samples per step from each stream
    rank_streams: range  # this rank's streams

    @property
    def per_rank(self) -> int:
        return self.per_stream * len(self.rank_streams)


def geometry(global_batch: int, world_size: int, rank: int, streams: int, workers: int) -> Geometry:
    """Resolve P (0 = world x max(1, workers)) and check it fits the batch, ranks and workers."""
    if global_batch % world_size:
        raise ConfigError(f"bad config key 'distill.global_batch_size': {global_batch} is not divisible by the "
                          f"world size {world_size}")
    p = streams or world_size * max(1, workers)
    if global_batch % p:
        raise ConfigError(f"bad config key 'distill.streams': {p} streams do not divide "
                          f"distill.global_batch_size={global_batch}")
    if p % world_size:
        raise ConfigError(f"bad config key 'distill.streams': {p} streams cannot be shared by {world_size} ranks")
    per_rank = p // world_size
    if workers > 1 and per_rank % workers:
        raise ConfigError(f"bad config key 'distill.loader_workers': {workers} workers do not divide the "
                          f"{per_rank} streams of a rank (distill.streams={p} over {world_size} ranks)")
    return Geometry(p, global_batch // p, range(rank * per_rank, (rank + 1) * per_rank))


class SampleOrder:
    """Which samples every stream yields, as a pure function (see the module docstring)."""

    def __init__(self, units: Sequence[Unit], streams: int, seed: int, round_idx: int, resample: bool = False):
        if not units:
            raise ShardError("no usable shards: nothing to train on")
        self.units, self.streams = list(units), streams
        self.seed, self.round_idx, self.resample = seed, round_idx, resample
        self.total = sum(u.samples for u in self.units)
        if not resample and self.total < streams:
            raise ConfigError(f"bad config key 'distill.streams': {streams} streams for {self.total} samples")
        # Part p of every epoch: [bounds[p], bounds[p + 1]) of the epoch's concatenation.
        self.bounds = [p * self.total // streams for p in range(streams + 1)]

    def part_size(self, p: int) -> int:
        return self.bounds[p + 1] - self.bounds[p]

    def permutation(self, epoch: int) -> np.ndarray:
        ss = np.random.SeedSequence([ORDER_DOMAIN, self.seed, self.round_idx, epoch])
        return np.random.default_rng(ss).permutation(len(self.units))

    def _epoch_part(self, p: int, epoch: int) -> Iterator[Segment]:
        a, b = self.bounds[p], self.bounds[p + 1]
        pos = 0
        for u in self.permutation(epoch):
            n = self.units[u].samples
            lo, hi = max(a, pos), min(b, pos + n)
            if lo < hi:
                yield Segment(int(u), lo - pos, hi - pos, epoch)
            pos += n
            if pos >= b:
                return

    def segments(self, p: int, position: int = 0) -> Iterator[Segment]:
        """Stream p from sample ``position`` of its own sequence on, forever."""
        if self.resample:
            yield from self._resampled(p, position)
            return
        size = self.part_size(p)
        if size == 0:
            raise ConfigError(f"bad config key 'distill.streams': stream {p} of {self.streams} has no sample")
        epoch, skip = divmod(position, size)
        for e in itertools.count(epoch):
            for seg in self._epoch_part(p, e):
                n = seg.stop - seg.start
                if skip >= n:
                    skip -= n
                    continue
                yield seg._replace(start=seg.start + skip)
                skip = 0

    def _resampled(self, p: int, position: int) -> Iterator[Segment]:
        rng = np.random.default_rng(np.random.SeedSequence([ORDER_DOMAIN, self.seed, self.round_idx, 1 << 20, p]))
        pos = 0
        for draw in itertools.count():
            u = int(rng.integers(len(self.units)))
            n = self.units[u].samples
            if pos + n > position:
                yield Segment(u, max(0, position - pos), n, draw)
            pos += n

    def take(self, p: int, position: int, count: int) -> list[tuple[int, int]]:
        """(sample index, epoch) of ``count`` samples of stream p from ``position`` (no I/O)."""
        out: list[tuple[int, int]] = []
        for seg in self.segments(p, position):
            first = self.units[seg.unit].first
            for off in range(seg.start, seg.stop):
                out.append((first + off, seg.epoch))
                if len(out) == count:
                    return out
        return out  # unreachable: streams are endless

    def step_indices(self, geo: Geometry, step: int, streams: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """(index, epoch) of the given streams' samples at ``step``, in batch order."""
        return [x for p in (geo.rank_streams if streams is None else streams)
                for x in self.take(p, step * geo.per_stream, geo.per_stream)]


# --------------------------------------------------------------------------------------------------
# Reading (WebDataset)
# --------------------------------------------------------------------------------------------------
def read_segment(root: Path, unit: Unit, seg: Segment) -> Iterator[dict[str, Any]]:
    """The decoded samples [start, stop) of one shard, each checked to be the index it should be."""
    url = str(root / unit.name)
    pipe = wds.DataPipeline(
        wds.SimpleShardList([url]),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.slice(seg.start, seg.stop),  # skipping happens before decoding: raw bytes only
        wds.map(shards.decode_sample),  # npy (allow_pickle=False) and json; anything else is refused
    )
    off = seg.start
    try:
        for sample in pipe:
            want = unit.first + off
            meta = sample.get("meta")
            if not isinstance(meta, dict) or meta.get("index") != want or sample.get("key") != shards.sample_key(want):
                raise ShardError(f"{url}: sample {off} is key {sample.get('key')!r} (meta {meta!r}), "
                                 f"expected index {want}")
            sample["epoch"] = seg.epoch
            yield sample
            off += 1
    except ShardError:
        raise
    except Exception as e:  # tar or decode errors of a shard that passed its checksum: it changed since
        raise ShardError(f"{url}: unreadable at sample {off}: {type(e).__name__}: {e}") from None
    if off != seg.stop:
        raise ShardError(f"{url}: ended after {off} samples, the manifest says {unit.samples}")


def _passthrough(item: Any) -> Any:  # DataLoader collate_fn (module level: picklable)
    return item


class TargetStream(IterableDataset):
    """One rank's streams from ``start_step`` on: items ``(step, stream, [samples])`` in (step,
    stream) order; under a DataLoader each worker serves every n-th of the rank's streams."""

    def __init__(self, root: str | Path, order: SampleOrder, geo: Geometry, start_step: int):
        super().__init__()
        self.root, self.order, self.geo, self.start_step = Path(root), order, geo, start_step

    def _samples(self, p: int) -> Iterator[dict[str, Any]]:
        for seg in self.order.segments(p, self.start_step * self.geo.per_stream):
            yield from read_segment(self.root, self.order.units[seg.unit], seg)

    def __iter__(self) -> Iterator[tuple[int, int, list[dict[str, Any]]]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = list(self.geo.rank_streams)[w::nw]
        its = {p: self._samples(p) for p in mine}
        c = self.geo.per_stream
        for step in itertools.count(self.start_step):
            for p in mine:
                yield step, p, [next(its[p]) for _ in range(c)]


class RankReader:
    """This rank's samples of a step (``batch(step)``), from a DataLoader over ``TargetStream``.
    Reading ahead is the DataLoader's prefetch; a step out of sequence restarts the stream there."""

    def __init__(self, root: str | Path, order: SampleOrder, geo: Geometry, workers: int = 0):
        self.root, self.order, self.geo, self.workers = Path(root), order, geo, workers
        self._it: Iterator | None = None
        self._next = -1

    def _open(self, step: int) -> None:
        self.close()
        ds = TargetStream(self.root, self.order, self.geo, step)
        if self.workers > 0:
            # forkserver: the workers are not forks of a process holding gloo/NCCL threads and locks;
            # the server imports this module once, so starting a worker is a cheap fork of it.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            loader = DataLoader(ds, batch_size=None, num_workers=self.workers, collate_fn=_passthrough,
                                multiprocessing_context=ctx, prefetch_factor=2)
            self._it = iter(loader)
        else:
            self._it = iter(ds)
        self._next = step

    def batch(self, step: int) -> list[dict[str, Any]]:
        if self._it is None or step != self._next:
            self._open(step)
        assert self._it is not None
        out = []
        for p in self.geo.rank_streams:
            k, q, samples = next(self._it)
            if (k, q) != (step, p):
                raise RuntimeError(f"data loader out of order: got step {k} stream {q}, expected step {step} "
                                   f"stream {p}")
            out.extend(samples)
        self._next = step + 1
        return out

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


# --------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------
def _positions(fields: Mapping[str, np.ndarray], codec: str) -> int:
    """How many masked positions a sample's codec fields describe."""
    return int(np.asarray(fields[codecs.get(codec).positions_field]).shape[0])


def collate_fields(samples: Sequence[Mapping[str, Any]], codec: str, mask_id: int, seq_len: int
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """xt [B, L] (int64), t [B] (float32) and every codec field concatenated over the samples in
    batch order: the row order of the student's masked positions on the same batch
    (``DiT(rows=xt == MASK)``) (the ragged sampled code
    concatenates too: its ``nuniq`` says where each position's ids end)."""
    xts, ts = [], []
    parts: dict[str, list[np.ndarray]] = {f: [] for f in codecs.get(codec).fields}
    for s in samples:
        where = f"sample {s.get('key')!r}"
        xt = np.asarray(s["xt"])
        if xt.shape != (seq_len,):
            raise ShardError(f"{where}: xt has shape {xt.shape}, expected ({seq_len},)")
        missing = [f for f in parts if f not in s]
        if missing:
            raise ShardError(f"{where}: missing field(s) {', '.join(missing)} of codec {codec}")
        m = int((xt == mask_id).sum())
        if _positions(s, codec) != m:
            raise ShardError(f"{where}: {_positions(s, codec)} coded positions for {m} masked tokens")
        xts.append(xt.astype(np.int64))
        ts.append(float(s["meta"]["t"]))
        for f in parts:
            parts[f].append(np.asarray(s[f]))
    fields = {f: np.concatenate(v, axis=0) for f, v in parts.items()}
    return torch.from_numpy(np.stack(xts)), torch.tensor(ts, dtype=torch.float32), fields


def describe(order: SampleOrder, geo: Geometry) -> str:
    steps = order.total / (geo.streams * geo.per_stream)
    kind = "resampled shards" if order.resample else f"{steps:.4g} steps per epoch"
    return (f"{order.total} samples in {len(order.units)} shards, {geo.streams} streams x {geo.per_stream} "
            f"samples per step ({kind})")

