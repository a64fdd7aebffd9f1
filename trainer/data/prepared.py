"""Corpora -> fixed-length token sequences, prepared once and read by every later job.

Three sources (``DataConfig.source``):
- ``synthetic``: a seeded sparse first-order Markov chain with a small uniform leak
  (``MarkovSource``, trainer/data/synthetic.py) whose likelihood, entropy rate and bigram law are
  exact, so model quality is measured against the truth, not a proxy;
- ``text``: local files and folders (trainer/data/corpus.py: plain text, jsonl, parquet, arrow,
  ``save_to_disk`` folders);
- ``hf``: a Hugging Face dataset by name (optional ``datasets`` package, cache or hub).

Text is tokenised in ``data.workers`` processes and packed into rows of ``seq_len``, each document
followed by EOS, cut anywhere or into MDLM's ``[BOS] ... [EOS]`` rows with ``data.wrap``
(trainer/data/packing.py). Documents are counted first (``data.expect_docs`` refuses a corpus that
is too small before anything is tokenised). With ``data.valid_docs`` the last documents are held out
and packed on their own, as MDLM and SDTT split OpenWebText: training rows never contain a held-out
document's text; ``valid.npy`` is a seeded sample of ``num_valid_sequences`` of their rows and
``test.npy`` (``data.test_docs``, the very last documents) all of its own. Without a holdout,
validation rows are random packed rows of the whole corpus.
``prepare_data`` writes ``train.npy``/``valid.npy`` (and ``test.npy``) ([N, L], uint16 when the
vocabulary fits in 16 bits, else int32; memory-mapped by every reader) and then ``data.json`` (what
made them, the document counts and a sha256 digest); every file appears by an atomic rename and
data.json comes last, so a reader that finds data.json finds complete arrays. ``batches`` turns the train array into the
deterministic, resumable per-rank stream the training loops consume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.data.corpus import count_documents, documents, expand_paths, iter_hf_documents, iter_text_documents  # noqa: F401
from trainer.data.errors import DataError
from trainer.data.packing import Part, bos_id, pack_parts, token_dtype
from trainer.data.synthetic import MarkovSource
from trainer.data.tokenizers import Tokenizer, load_tokenizer
from trainer.fileio import atomic_write_json, writing

# bump when the meaning of prepared files or of their inputs changes. 2: uint16 tokens when the vocabulary
# fits, data.wrap, plain-text/parquet/arrow/save_to_disk inputs. 3: wrapped rows as MDLM's (no BOS per
# document, groups of 1000 documents), document holdouts, test.npy.
FORMAT_VERSION = 3
SPLITS = ("train", "valid", "test")  # test only when data.test_docs > 0


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------
def split_indices(n: int, num_valid: int, num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``n`` rows: ``num_valid`` random rows for validation, the rest (at most
    ``num_train`` when > 0) for training; both in increasing row order (sequential reads)."""
    if n <= num_valid:
        raise DataError(f"data.num_valid_sequences: the corpus packs into {n} sequences, not more than "
                        f"the {num_valid} validation sequences asked for")
    perm = np.random.default_rng(seed).permutation(n)
    valid = np.sort(perm[:num_valid])
    train = perm[num_valid:]
    if num_train > 0:
        train = train[:num_train]
    return np.sort(train), valid


# --------------------------------------------------------------------------------------------------
# Prepared data on disk
# --------------------------------------------------------------------------------------------------
_ROWS_PER_WRITE = 4096  # fixed: the synthetic draws are made in blocks of this many rows


def data_dir(cfg: DataConfig, run_dir: str | Path) -> Path:
    """Where a run's prepared data lives: ``data.cache_dir`` if set, else ``<run>/data``."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(run_dir) / "data"


def prepare_data(cfg: DataConfig, out_dir: str | Path, progress: bool = False) -> Path:
    """Write ``train.npy``, ``valid.npy`` and ``data.json`` under ``out_dir`` (once).

    If data.json exists with the same inputs, nothing is rewritten. If it exists with different
    inputs, that is an error: the folder may hold the data of a run that is still in use.
    """
    out = Path(out_dir)
    tokenizer = None if cfg.source == "synthetic" else load_tokenizer(cfg.tokenizer)
    inputs = _jsonable(_digest_inputs(cfg, tokenizer))
    if (out / "data.json").exists():
        info = load_data_info(out)
        if info.get("inputs") == inputs:
            for split in splits_of(info):
                load_split(out, split)  # present and of the recorded shape, or a clear error
            if "num_docs" in info:
                check_expected_docs(cfg, int(info["num_docs"]), str(info.get("source", out)))
            return out
        changed = sorted(k for k in set(inputs) | set(info.get("inputs", {}))
                         if inputs.get(k) != info.get("inputs", {}).get(k))
        raise DataError(f"{out / 'data.json'}: prepared from different inputs (changed: "
                        f"{', '.join(changed)}); use another data.cache_dir or delete {out}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.source == "synthetic":
        info = _prepare_synthetic(cfg, out)
    else:
        assert tokenizer is not None
        info = _prepare_text(cfg, tokenizer, out, progress)
    info.update(format=FORMAT_VERSION, inputs=inputs, seq_len=cfg.seq_len)
    atomic_write_json(out / "data.json", info, indent=2)
    return out


def _digest_inputs(cfg: DataConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """Everything that determines the prepared arrays, and nothing else."""
    common = dict(format=FORMAT_VERSION, source=cfg.source, seq_len=cfg.seq_len, seed=cfg.seed,
                  num_train_sequences=cfg.num_train_sequences, num_valid_sequences=cfg.num_valid_sequences)
    if cfg.source == "synthetic":
        return dict(common, synthetic=dataclasses.asdict(cfg.synthetic))
    assert tokenizer is not None
    common.update(tokenizer=tokenizer.name, text_field=cfg.text_field, wrap=cfg.wrap, valid_docs=cfg.valid_docs,
                  test_docs=cfg.test_docs)
    if cfg.source == "text":
        # Path and size, not content: hashing a large corpus on every job start would cost minutes.
        files = [[str(p.resolve()), _size(p)] for p in expand_paths(cfg.paths)]
        return dict(common, files=files, hf_split=cfg.hf_split)
    if cfg.source == "hf":
        return dict(common, hf_name=cfg.hf_name, hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                    hf_revision=cfg.hf_revision)
    raise DataError(f"data.source: unknown source '{cfg.source}'")


def _size(path: Path) -> int:
    """A file's size; a save_to_disk folder's total size."""
    if path.is_dir():
        return sum(f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file())
    return path.stat().st_size


def _prepare_synthetic(cfg: DataConfig, out: Path) -> dict[str, Any]:
    source = MarkovSource(cfg.synthetic)
    # The chain depends on synthetic.seed only; the draws on (synthetic.seed, data.seed), with train
    # and valid as independent child streams.
    train_seq, valid_seq = np.random.SeedSequence([cfg.synthetic.seed, cfg.seed]).spawn(2)
    counts = {"train": cfg.num_train_sequences, "valid": cfg.num_valid_sequences}
    streams = {"train": np.random.default_rng(train_seq), "valid": np.random.default_rng(valid_seq)}

    def blocks(split: str) -> Iterator[np.ndarray]:
        for start in range(0, counts[split], _ROWS_PER_WRITE):
            n = min(_ROWS_PER_WRITE, counts[split] - start)
            yield source.sample(n, cfg.seq_len, streams[split])

    dtype = token_dtype(cfg.synthetic.vocab_size)
    digest = _write_splits(out, cfg.seq_len, {s: (counts[s], blocks(s)) for s in ("train", "valid")}, dtype)
    s = cfg.synthetic
    return dict(
        source=(f"synthetic Markov chain (vocab {s.vocab_size}, branching {s.branching}, "
                f"concentration {s.concentration}, leak {s.leak}, seed {s.seed})"),
        tokenizer="synthetic", vocab_size=s.vocab_size, eos_id=None, dtype=dtype.name,
        num_train=counts["train"], num_valid=counts["valid"], digest=digest,
        entropy_rate=source.entropy_rate,
        sequence_entropy_per_token=source.sequence_entropy_per_token(cfg.seq_len),
    )


def check_expected_docs(cfg: DataConfig, found: int, description: str) -> None:
    """``data.expect_docs``: refuse a corpus with fewer documents, naming the usual cause."""
    if cfg.expect_docs and found < cfg.expect_docs:
        raise DataError(f"data.expect_docs: {description} holds {found:,} documents, fewer than the "
                        f"{cfg.expect_docs:,} expected: most likely a partial download or a partial parquet "
                        f"conversion (the hub converts only the first 5 GB of a large dataset, into "
                        f"'partial-train' files); fetch the complete dataset (docs/text.md)")


def _prepare_text(cfg: DataConfig, tokenizer: Tokenizer, out: Path, progress: bool = False) -> dict[str, Any]:
    docs, description = documents(cfg)
    n_docs = count_documents(cfg)
    check_expected_docs(cfg, n_docs, description)
    held = cfg.valid_docs + cfg.test_docs
    if held and n_docs <= held:
        raise DataError(f"data.valid_docs: {description} holds {n_docs:,} documents, not more than the "
                        f"{held:,} held out (data.valid_docs + data.test_docs); nothing would be left to train on")
    if held:
        parts = [Part("train", n_docs - held, cfg.num_train_sequences), Part("valid", cfg.valid_docs)]
        if cfg.test_docs:
            parts.append(Part("test", cfg.test_docs))
    else:  # one stream, split by rows below
        max_rows = cfg.num_train_sequences + cfg.num_valid_sequences if cfg.num_train_sequences > 0 else 0
        parts = [Part("all", -1, max_rows)]
    dtype = token_dtype(tokenizer.vocab_size)
    workers = cfg.workers or auto_workers(cfg)
    # Pack into flat scratch files first (one per part): the row counts are unknown until the end and
    # may not fit in memory; the splits then copy rows out of their memory maps.
    scratch = [out / f".packed-{p.name}.{os.getpid()}.tmp" for p in parts]
    stats: dict = {}
    t0 = time.perf_counter()
    try:
        files = [path.open("wb") for path in scratch]
        try:
            for k, block in pack_parts(docs, parts, cfg.tokenizer, tokenizer, cfg.seq_len, wrap=cfg.wrap,
                                       workers=workers, dtype=dtype, progress=progress, stats=stats):
                with writing(scratch[k]):
                    files[k].write(block.tobytes())
        finally:
            for path, f in zip(scratch, files):
                with writing(path):
                    f.close()
        seconds = time.perf_counter() - t0
        rows, read = stats["rows"], sum(stats["docs"])
        if (held or not parts[0].max_rows) and read != n_docs:
            raise DataError(f"data.paths: {description} yielded {read:,} documents while being packed but "
                            f"{n_docs:,} when counted; did the files change?")
        if rows[0] == 0:
            raise DataError(f"data.source={cfg.source}: {description} gives no complete sequence of "
                            f"data.seq_len={cfg.seq_len} tokens" + (" for training" if held else ""))
        packed = [np.memmap(path, dtype=dtype, mode="r", shape=(n, cfg.seq_len)) if n else None
                  for path, n in zip(scratch, rows)]
        if held:
            split_rows = _holdout_rows(cfg, description, rows)
            sources = {name: (packed[k], idx) for name, (k, idx) in split_rows.items()}
        else:
            train_idx, valid_idx = split_indices(rows[0], cfg.num_valid_sequences, cfg.num_train_sequences,
                                                 cfg.seed)
            sources = {"train": (packed[0], train_idx), "valid": (packed[0], valid_idx)}

        def blocks(arr: np.memmap, idx: np.ndarray) -> Iterator[np.ndarray]:
            for start in range(0, idx.size, _ROWS_PER_WRITE):
                yield np.asarray(arr[idx[start:start + _ROWS_PER_WRITE]])

        digest = _write_splits(out, cfg.seq_len, {name: (idx.size, blocks(arr, idx))
                                                  for name, (arr, idx) in sources.items()}, dtype)
        counts = {f"num_{name}": int(idx.size) for name, (_, idx) in sources.items()}
        del packed, sources  # the memmaps must close before the scratch files are unlinked
    finally:
        for path in scratch:
            path.unlink(missing_ok=True)
    doc_split = ({p.name + "_docs": (p.docs if p.docs >= 0 else n_docs) for p in parts} if held else {})
    return dict(source=description, tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                eos_id=tokenizer.eos_id, bos_id=bos_id(tokenizer) if cfg.wrap else None, wrap=cfg.wrap,
                dtype=dtype.name, **counts, num_packed=int(sum(rows)), num_docs=n_docs, docs_read=read,
                holdout=("last documents" if held else "none: validation rows are random rows of the whole corpus"),
                **doc_split, digest=digest, text_bytes=stats["bytes"], tokens=stats["tokens"], workers=workers,
                pack_seconds=round(seconds, 4), mb_per_s=float(f"{stats['bytes'] / 1e6 / max(seconds, 1e-9):.4g}"))


def _holdout_rows(cfg: DataConfig, description: str, rows: list[int]) -> dict[str, tuple[int, np.ndarray]]:
    """Split name -> (part index, rows of that part's scratch): every training row (up to the cap,
    already applied while packing), a seeded sample of ``num_valid_sequences`` held-out rows in
    increasing order, every test row."""
    if rows[1] < cfg.num_valid_sequences:
        raise DataError(f"data.valid_docs: the {cfg.valid_docs:,} held-out documents of {description} pack into "
                        f"{rows[1]} rows of data.seq_len={cfg.seq_len}, fewer than data.num_valid_sequences="
                        f"{cfg.num_valid_sequences}; hold out more documents or ask for fewer rows")
    valid = np.sort(np.random.default_rng(cfg.seed).permutation(rows[1])[:cfg.num_valid_sequences])
    out = {"train": (0, np.arange(rows[0])), "valid": (1, valid)}
    if cfg.test_docs:
        if rows[2] == 0:
            raise DataError(f"data.test_docs: the last {cfg.test_docs:,} documents of {description} give no "
                            f"complete row of data.seq_len={cfg.seq_len}; hold out more")
        out["test"] = (2, np.arange(rows[2]))
    return out


AUTO_MB_PER_WORKER = 32  # below this much text per process, spawning one costs more than it saves


def auto_workers(cfg: DataConfig) -> int:
    """data.workers=0: every available CPU, but no more than one per AUTO_MB_PER_WORKER MB of local
    input (a worker's start-up, seconds on a busy machine, must pay for itself)."""
    cpus = available_cpus()
    if cfg.source != "text":
        return cpus
    total = sum(_size(p) for p in expand_paths(cfg.paths))
    return max(1, min(cpus, -(-total // (AUTO_MB_PER_WORKER * 10**6))))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _write_splits(out: Path, seq_len: int, splits: dict[str, tuple[int, Iterable[np.ndarray]]],
                  dtype: np.dtype) -> str:
    """Write each split to a temporary .npy, hashing the rows as they go, then rename all of them.
    Returns the digest: sha256 over (name, shape, dtype, C-order bytes) of each split in order."""
    digest = hashlib.sha256()
    tmp_paths: dict[str, Path] = {}
    try:
        for split, (n, blocks) in splits.items():
            tmp = out / f".{split}.{os.getpid()}.tmp"
            tmp_paths[split] = tmp
            digest.update(f"{split}:{n}x{seq_len}:{dtype.name};".encode())
            with writing(out / f"{split}.npy"):
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, seq_len))
                # Reserve the file's blocks now: a store into a memory map of a full file system
                # is a SIGBUS that kills the process, where fallocate raises ENOSPC.
                with open(tmp, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            row = 0
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                arr[row:row + block.shape[0]] = block
                digest.update(block.tobytes())
                row += block.shape[0]
            if row != n:
                raise RuntimeError(f"{tmp}: wrote {row} rows, expected {n}")
            with writing(out / f"{split}.npy"):
                arr.flush()
            del arr
    except BaseException:
        for tmp in tmp_paths.values():  # never leave a partial split taking the space
            tmp.unlink(missing_ok=True)
        raise
    for split, tmp in tmp_paths.items():
        os.replace(tmp, out / f"{split}.npy")
    return digest.hexdigest()


def _jsonable(obj: Any) -> Any:
    """What ``obj`` reads back as from JSON (tuples become lists), so stored and fresh inputs compare."""
    return json.loads(json.dumps(obj))


_INFO_KEYS = ("digest", "inputs", "num_train", "num_valid", "seq_len", "tokenizer", "vocab_size")


def load_data_info(out_dir: str | Path) -> dict[str, Any]:
    """The ``data.json`` of prepared data."""
    path = Path(out_dir) / "data.json"
    if not path.is_file():
        raise DataError(f"no prepared data: {path} not found (run python -m trainer.jobs.prepare)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt data.json: {e}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: corrupt data.json: not a JSON object")
    missing = [k for k in _INFO_KEYS if k not in info]
    if missing:
        raise DataError(f"{path}: corrupt data.json: missing key(s) {', '.join(missing)}")
    return info


def splits_of(info: dict[str, Any]) -> tuple[str, ...]:
    """The splits a data.json lists: train and valid, and test when it has test rows."""
    return tuple(s for s in SPLITS if s != "test" or info.get("num_test"))


def load_split(out_dir: str | Path, split: str) -> np.ndarray:
    """A prepared split as a read-only memory map ([N, L] of data.json's dtype: uint16 when the
    vocabulary fits, else int32), checked against data.json. Readers convert rows to int64."""
    info = load_data_info(out_dir)
    if split not in splits_of(info):
        raise DataError(f"{Path(out_dir) / 'data.json'}: no split '{split}' (this data has "
                        f"{', '.join(splits_of(info))}; test needs data.test_docs)")
    path = Path(out_dir) / f"{split}.npy"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} not found, though data.json lists it; prepare the data again") from None
    except (ValueError, OSError) as e:  # bad header, truncated data
        raise DataError(f"{path}: corrupt token file: {e}") from None
    expected = (info[f"num_{split}"], info["seq_len"])
    dtype = np.dtype(info.get("dtype", "int32"))
    if arr.dtype != dtype or arr.shape != expected:
        raise DataError(f"{path}: holds {arr.dtype} {arr.shape}, data.json says {dtype.name} {expected}")
    return arr


def data_digest(out_dir: str | Path) -> str:
    """The sha256 digest of the prepared token arrays, as recorded in data.json."""
    return str(load_data_info(out_dir)["digest"])


# --------------------------------------------------------------------------------------------------
# Training batches
# --------------------------------------------------------------------------------------------------
def batches(tokens: np.ndarray, batch_size: int, rank: int, world_size: int, seed: int,
            start_step: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """The endless, deterministic stream ``(step, LongTensor[batch_size // world_size, L])`` of one rank.

    Epoch e is a permutation of the rows seeded by (seed, e); the global batch of step k is the
    (k mod steps_per_epoch)-th slice of ``batch_size`` rows of epoch k // steps_per_epoch (the rows
    left over at the end of an epoch are skipped), and rank r takes the r-th contiguous part of it.
    Everything is a function of the step, so starting at ``start_step`` replays exactly what an
    uninterrupted run would have seen, whatever happened before.
    """
    n = tokens.shape[0]
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batches: rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"batches: global batch {batch_size} is not a positive multiple of the world "
                         f"size {world_size}")
    if n < batch_size:
        raise DataError(f"batches: {n} sequences are fewer than one global batch of {batch_size}")
    local = batch_size // world_size
    steps_per_epoch = n // batch_size
    epoch, perm = -1, np.empty(0, dtype=np.int64)
    step = start_step
    while True:
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            perm = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)
        start = (step % steps_per_epoch) * batch_size + rank * local
        rows = np.asarray(tokens[perm[start:start + local]], dtype=np.int64)
        yield step, torch.from_numpy(rows)
        step += 1

