"""The target-set format: WebDataset tar shards of SDTT targets, their manifest, and checks.

A target set is a folder (``<run>/round_<r>/targets/``) holding

* shards ``<prefix>-<rank>-<j>.tar``: shard j holds the samples [j S, (j + 1) S) in index order
  (S = the plan's samples per shard), written by ``rank``. Which samples a shard holds is a
  function of the index alone, so ranks own whole shards, a rerun with any number of ranks can
  skip the complete ones, and the shard's bytes are the same whoever wrote it (deterministic tar
  headers): shards of two runs compare by sha256;
* one sample per noised sequence, its files contiguous: ``<key>.xt.npy`` (int32 [L], MASK = V),
  the codec's fields ``<key>.<field>.npy`` (trainer/method/codecs/) for the M masked positions in
  position order, and ``<key>.meta.json`` (index, round, t, num_masked); key = index, 10 digits;
* ``plan.json``: the header (what produces the set) written before any shard; a rerun with other
  settings is refused instead of mixing two target sets;
* ``progress/shard-<j>.json``: the completion record of shard j (name, samples, bytes, sha256,
  stats), written BEFORE the shard's atomic rename: a published shard always has a record, and a
  record without its shard (a kill between the two) just means "redo";
* ``manifest.json``: header + every shard's name, sample count, bytes and sha256 + totals, written
  last and atomically by rank 0. It carries no timestamps or hosts: a rerun that resumed after a
  crash ends with the same manifest as a clean run.

Shards are written under a temporary name (``.<name>.tmp``) and published by ``os.replace``;
leftovers of a killed run are removed by ``remove_temporaries`` before a rerun starts.

Reading: ``iter_samples`` (plain tarfile) and ``decode_sample`` (for a WebDataset pipeline's map)
decode npy (allow_pickle=False) and json only, never pickle. The streaming reader of the
distillation job builds on these, ``read_manifest`` and ``check_compatible``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from trainer import fileio
from trainer.config import RunConfig
from trainer.errors import BadInput
from trainer.fileio import atomic_write_json, fsync_dir, sha256_file
from trainer.method import codecs

FORMAT = "sdtt-targets/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"
PROGRESS = "progress"
TMP_SUFFIX = ".tmp"
_TAR_BLOCK = 512
_NPY_HEADER_MAX = 256  # np.save pads the header to a multiple of 64; ours are ~128 bytes
_META_MAX = 512


class ShardError(BadInput, RuntimeError):
    """A target set or shard that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# The plan: which sample goes where
# --------------------------------------------------------------------------------------------------
def max_sample_bytes(codec: str, k: int, vocab: int, seq_len: int) -> int:
    """An upper bound of one sample's bytes in a tar (all L positions masked, worst-case code)."""
    payload = {"xt": 4 * seq_len}
    per_pos = codecs.bytes_per_position(codec, k, vocab)
    for name in codecs.get(codec).fields:  # bound every field by the whole per-position payload
        payload[name] = int(math.ceil(per_pos * seq_len))
    payload["meta"] = _META_MAX
    total = 0
    for size in payload.values():
        total += _TAR_BLOCK + _round_up(size + _NPY_HEADER_MAX, _TAR_BLOCK)
    return total


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def samples_per_shard(count_limit: int, max_bytes: int, sample_bytes: int) -> int:
    """Shards rotate at ``count_limit`` samples, or earlier when the worst-case sample size says
    the shard could pass ``max_bytes``: decided once, from bounds, so the sample -> shard map stays
    a function of the index (a size-triggered rotation at write time would depend on content)."""
    return max(1, min(count_limit, max_bytes // max(1, sample_bytes)))


def plan_for(cfg: RunConfig, num_samples: int | None = None) -> ShardPlan:
    """The run's sharding plan: ``num_samples`` (default ``targets.num_samples``) in shards of
    ``samples_per_shard`` under the codec's worst-case sample size. The one home of the rule: the
    targets job writes by it, the online student reads the units an offline student would, and
    ``tools/bench.py targets`` times it."""
    g = cfg.targets
    per_shard = samples_per_shard(g.samples_per_shard, g.shard_max_bytes,
                                  max_sample_bytes(g.codec, g.k, cfg.model.vocab_size, cfg.data.seq_len))
    return ShardPlan(g.num_samples if num_samples is None else num_samples, per_shard)


@dataclass(frozen=True)
class ShardPlan:
    num_samples: int
    samples_per_shard: int
    prefix: str = "targets"

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def indices(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_samples))

    def owned(self, rank: int, world_size: int) -> list[int]:
        """Round-robin: rank r writes shards r, r + W, r + 2W, ..."""
        return list(range(rank, self.num_shards, world_size))

    def batches(self, shard: int, batch_size: int) -> list[range]:
        """The teacher batches of a shard: consecutive blocks of ``batch_size`` indices from the
        shard's start. Fixed by index, so every run feeds the teacher the same batches (batched
        matmuls are not bitwise batch-invariant)."""
        r = self.indices(shard)
        return [range(s, min(s + batch_size, r.stop)) for s in range(r.start, r.stop, batch_size)]

    def shard_name(self, rank: int, shard: int) -> str:
        return f"{self.prefix}-{rank:04d}-{shard:06d}.tar"

    def shard_glob(self, shard: int) -> str:
        return f"{self.prefix}-*-{shard:06d}.tar"


def header_digest(header: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def _record_path(out_dir: Path, shard: int) -> Path:
    return out_dir / PROGRESS / f"shard-{shard:06d}.json"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


# --------------------------------------------------------------------------------------------------
# Starting (or resuming) a target set
# --------------------------------------------------------------------------------------------------
def remove_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files a killed run left (shards and JSON being written). Only safe while
    no writer is running: the job calls it on rank 0 before the start barrier."""
    out_dir = Path(out_dir)
    removed = []
    for folder in (out_dir, out_dir / PROGRESS):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.name.endswith(TMP_SUFFIX):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def start_set(out_dir: str | Path, header: Mapping[str, Any]) -> None:
    """Create the folder and write plan.json, or check that an existing one has the same header."""
    out_dir = Path(out_dir)
    (out_dir / PROGRESS).mkdir(parents=True, exist_ok=True)
    path = out_dir / PLAN
    if path.exists():
        check_compatible(_read_json(path), header, where=str(path))
    else:
        atomic_write_json(path, dict(header))


def check_compatible(stored: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Refuse a target set made with other settings, naming every differing field."""
    diff = [f"{k}: stored {stored.get(k)!r}, expected {expected.get(k)!r}"
            for k in sorted(expected) if k != "shards" and stored.get(k) != expected.get(k)]
    if diff:
        raise ShardError(f"{where}: the target set was made with other settings ({'; '.join(diff)}); "
                         "use the matching config, or delete the folder to rebuild it")


def completed(out_dir: str | Path, shard: int, plan_digest: str, check_sha: bool = True) -> dict | None:
    """The completion record of ``shard`` if the shard is published, of this plan, and intact."""
    out_dir = Path(out_dir)
    rp = _record_path(out_dir, shard)
    if not rp.is_file():
        return None
    try:
        rec = json.loads(rp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if rec.get("plan") != plan_digest:
        return None
    path = out_dir / rec["name"]
    if not path.is_file() or path.stat().st_size != rec["bytes"]:
        return None
    if check_sha and sha256_file(path) != rec["sha256"]:
        return None
    return rec


# --------------------------------------------------------------------------------------------------
# Writing one shard
# --------------------------------------------------------------------------------------------------
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def sample_key(index: int) -> str:
    return f"{index:010d}"


class ShardWriter:
    """Writes one shard under its temporary name; ``finish`` publishes it, ``abort`` drops it.

    Tar headers are deterministic (mtime 0, uid/gid 0, no user names), so the bytes depend only on
    the samples. Use as a context manager: an exception aborts, so no half shard is ever published.
    """

    def __init__(self, out_dir: str | Path, plan: ShardPlan, shard: int, rank: int, plan_digest: str):
        self.out_dir = Path(out_dir)
        self.plan, self.shard, self.rank, self.plan_digest = plan, shard, rank, plan_digest
        self.name = plan.shard_name(rank, shard)
        self.path = self.out_dir / self.name
        self.tmp = _tmp_path(self.path)
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.stats: dict[str, float] = {}
        self._expected = plan.indices(shard)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, index: int, xt: np.ndarray, fields: Mapping[str, np.ndarray], meta: Mapping[str, Any],
            stats: Mapping[str, float] | None = None) -> int:
        """Append one sample (all its files together); returns the bytes written so far."""
        want = self._expected.start + self.count
        if index != want:
            raise ShardError(f"{self.name}: sample {index} out of order (expected {want})")
        key = sample_key(index)
        self._add(f"{key}.xt.npy", _npy_bytes(np.asarray(xt, dtype=np.int32)))
        for fname, arr in fields.items():
            self._add(f"{key}.{fname}.npy", _npy_bytes(arr))
        self._add(f"{key}.meta.json", json.dumps(dict(meta), sort_keys=True).encode())
        self.count += 1
        for k, v in (stats or {}).items():
            if k.endswith("_max"):
                self.stats[k] = max(self.stats.get(k, 0.0), float(v))
            else:
                self.stats[k] = self.stats.get(k, 0.0) + float(v)
        return self._file.tell()

    def _close(self) -> None:
        if not self._file.closed:
            self._tar.close()  # writes the end-of-archive blocks: forgetting it truncates the tar
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def finish(self) -> dict[str, Any]:
        """Close, record, publish (in that order). Returns the completion record."""
        if self.count != len(self._expected):
            self.abort()
            raise ShardError(f"{self.name}: {self.count} samples written, the plan says {len(self._expected)}")
        self._close()
        rec = {"shard": self.shard, "name": self.name, "rank": self.rank, "samples": self.count,
               "first": self._expected.start, "bytes": self.tmp.stat().st_size,
               "sha256": sha256_file(self.tmp), "plan": self.plan_digest, "stats": self.stats}
        atomic_write_json(_record_path(self.out_dir, self.shard), rec)
        for old in self.out_dir.glob(self.plan.shard_glob(self.shard)):  # an unrecorded earlier copy
            if old.name != self.name:
                old.unlink(missing_ok=True)
        os.replace(self.tmp, self.path)
        fsync_dir(self.out_dir)
        return rec

    def abort(self) -> None:
        try:
            self._close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------
def write_manifest(out_dir: str | Path, header: Mapping[str, Any], plan: ShardPlan) -> dict[str, Any]:
    """Assemble manifest.json from every shard's completion record (rank 0, after all ranks are
    done). Checks presence and size of every shard, not checksums (``verify`` re-reads them)."""
    out_dir = Path(out_dir)
    digest = header_digest(header)
    shards, missing = [], []
    totals: dict[str, float] = {}
    for j in range(plan.num_shards):
        rec = completed(out_dir, j, digest, check_sha=False)
        if rec is None:
            missing.append(j)
            continue
        shards.append({"name": rec["name"], "samples": rec["samples"], "first": rec["first"],
                       "bytes": rec["bytes"], "sha256": rec["sha256"]})
        for k, v in rec["stats"].items():
            totals[k] = max(totals.get(k, 0.0), v) if k.endswith("_max") else totals.get(k, 0.0) + v
    if missing:
        shown = ", ".join(str(j) for j in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ShardError(f"{out_dir}: {len(missing)} of {plan.num_shards} shards are missing or incomplete "
                         f"(shard {shown}); rerun the targets job to finish them")
    samples = sum(s["samples"] for s in shards)
    positions = totals.get("positions", 0.0)
    manifest = dict(header)
    manifest["shards"] = shards
    manifest["totals"] = {
        "samples": samples,
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "positions": int(positions),
        "payload_bytes": int(totals.get("payload_bytes", 0.0)),
        "payload_bytes_per_position": totals.get("payload_bytes", 0.0) / max(positions, 1.0),
        "bytes_per_position": sum(s["bytes"] for s in shards) / max(positions, 1.0),
    }
    if "tail_mass_sum" in totals:
        manifest["totals"]["tail_mass_mean"] = totals["tail_mass_sum"] / max(positions, 1.0)
        manifest["totals"]["tail_mass_max"] = totals.get("tail_mass_max", 0.0)
    if "distinct_sum" in totals:
        manifest["totals"]["distinct_mean"] = totals["distinct_sum"] / max(positions, 1.0)
    if samples != header.get("num_samples", samples):
        raise ShardError(f"{out_dir}: shards hold {samples} samples, the plan says {header['num_samples']}")
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def _read_json(path: Path) -> dict[str, Any]:
    return fileio.read_json(path, ShardError, want_object=True)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    m = _read_json(out_dir / MANIFEST)
    if m.get("format") != FORMAT:
        raise ShardError(f"{out_dir / MANIFEST}: format {m.get('format')!r}, this code reads {FORMAT!r}")
    return m


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------
class BadShard(NamedTuple):
    name: str
    reason: str


def verify(out_dir: str | Path) -> list[BadShard]:
    """Every problem of a target set: a missing/corrupt manifest, and per listed shard: missing,
    wrong size (truncated or grown), sha256 mismatch (bit flips). Empty list = intact."""
    out_dir = Path(out_dir)
    try:
        manifest = read_manifest(out_dir)
    except ShardError as e:
        return [BadShard(MANIFEST, str(e))]
    bad = []
    for s in manifest.get("shards", []):
        reason = fileio.verify_file(out_dir / s["name"], s)
        if reason is not None:
            bad.append(BadShard(s["name"], reason))
    return bad


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
# The header np.save writes for a C-ordered numeric array (npy format 1.0), e.g.
#   {'descr': '<i4', 'fortran_order': False, 'shape': (64,), }   then spaces and '\n'
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][biuf][1248])', 'fortran_order': False, "
                         rb"'shape': \(((?:\d+, )*\d+,?|)\), \} *\n")


def _npy_fast(data: bytes) -> np.ndarray | None:
    """Decode the npy files our writer makes without np.load, whose header parse (ast.literal_eval)
    was half the decode time of a sample (tools/bench.py loader). Strict: anything but a C-ordered
    bool/int/uint/float array with a standard 1.0 header returns None (np.load then decides)."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    m = _NPY_HEADER.fullmatch(data[10:end])
    if m is None:
        return None
    dtype = np.dtype(m.group(1).decode())
    shape = tuple(int(d) for d in m.group(2).split(b",") if d.strip())
    count = math.prod(shape)
    if len(data) != end + count * dtype.itemsize:
        return None  # truncated or padded: let np.load produce its error
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape).copy()  # writable, owned


def decode_member(ext: str, data: bytes, where: str = "") -> Any:
    """npy (allow_pickle=False) or json; anything else is refused (never unpickle shard content)."""
    if ext.endswith(".npy"):
        try:
            fast = _npy_fast(data)
            return fast if fast is not None else np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise ShardError(f"{where}: cannot decode {ext}: {e}") from None
    if ext.endswith(".json"):
        return json.loads(data)
    raise ShardError(f"{where}: unexpected member type '{ext}' (only .npy and .json are read)")


def decode_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A WebDataset raw sample ({'__key__', 'xt.npy': bytes, ...}) -> {'key', 'xt', <fields>, 'meta'}."""
    where = str(raw.get("__url__", "")) + ":" + str(raw.get("__key__", "?"))
    out: dict[str, Any] = {"key": raw.get("__key__")}
    for ext, data in raw.items():
        if ext.startswith("__"):
            continue
        out[ext.split(".")[0]] = decode_member(ext, data, where)
    return out


def iter_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in order (plain tarfile; for tests, tools and checks)."""
    path = Path(path)
    current: dict[str, Any] = {}
    key = None
    try:
        with tarfile.open(path, mode="r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = member.name.partition(".")
                if k != key:
                    if current:
                        yield decode_sample(current)
                    current, key = {"__key__": k, "__url__": str(path)}, k
                f = tar.extractfile(member)
                assert f is not None
                current[ext] = f.read()
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"{path}: unreadable tar ({e})") from None
    if current:
        yield decode_sample(current)


# --------------------------------------------------------------------------------------------------
# Human summary (tools/inspect_shards.py)
# --------------------------------------------------------------------------------------------------
def summarize(out_dir: str | Path) -> list[str]:
    m = read_manifest(out_dir)
    t = m["totals"]
    lines = [
        f"target set {out_dir}",
        f"  made by    teacher {m['teacher']} ({m['teacher_weights']}, sha256 {m['teacher_sha256'][:16]}...)",
        f"             data digest {m['data_digest'][:16]}..., tokenizer {m['tokenizer']}",
        f"  settings   round {m['round']}, student steps {m['student_steps']}, teacher steps m={m['teacher_steps']}, "
        f"dt={m['dt']:.6g}, seed {m['seed']}",
        f"  codec      {m['codec']} (K={m['k']}), vocabulary {m['vocab_size']}, sequence length {m['seq_len']}",
        f"  samples    {t['samples']} in {t['shards']} shards ({m['samples_per_shard']} per shard), "
        f"{t['positions']} masked positions ({t['positions'] / max(t['samples'], 1):.1f} per sample)",
        f"  size       {t['bytes'] / 1e6:.2f} MB; bytes/position: payload {t['payload_bytes_per_position']:.1f}, "
        f"on disk {t['bytes_per_position']:.1f} (with npy and tar headers)",
    ]
    if "tail_mass_mean" in t:
        lines.append(f"  tail mass  mean {t['tail_mass_mean']:.4g}, max {t['tail_mass_max']:.4g} "
                     "(teacher probability outside the stored top-K)")
    if "distinct_mean" in t:
        lines.append(f"  distinct   {t['distinct_mean']:.2f} ids per position from K={m['k']} draws")
    return lines
