"""Tokenise documents in parallel and pack them into fixed-length rows, streaming, in bounded memory.

Documents are read in the calling process and sent in batches to ``workers`` tokeniser processes;
results come back in submission order (so the rows do not depend on the number of workers) with at
most ``2 x workers`` batches in flight, and a ``Packer`` per part of the corpus (``Part``: the
training documents, the held-out ones) cuts its token stream into rows as it arrives. Memory is a
few batches of text plus one row of carry per part, whatever the corpus size.

Every document is followed by EOS in both layouts (``data.wrap``):
- unwrapped (default): the stream of a part is cut into rows of L tokens;
- wrapped (MDLM's ``wrap``, how mdlm-owt was trained): the stream is cut into chunks of L - 2 tokens
  and each row is ``[BOS] chunk [EOS]``. For GPT-2, BOS = EOS = ``<|endoftext|>`` (50256), so a row
  reads ``<eot> ...doc a<eot>doc b... <eot>``. MDLM groups the documents as ``datasets.map(batched=True)``
  hands them over, ``WRAP_GROUP_DOCS`` at a time, and drops each group's last partial chunk
  (mdlm ``dataloader.py`` ``_group_texts``); so do we, counting groups from the first document of
  each part. (MDLM's map also restarts its groups at each of its ``num_proc`` contiguous shards, a
  machine-dependent detail not reproduced: it moves at most one partial chunk per shard.)
The final partial row of a part is dropped in both.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from trainer.data.tokenizers import Tokenizer, load_tokenizer

BATCH_DOCS = 256  # documents per task sent to a worker
WRAP_GROUP_DOCS = 1000  # MDLM's grouping unit: datasets.map's default batch_size


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits, else int32: half the disk and page cache for GPT-2."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def bos_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's BOS if it has one, else its EOS (GPT-2 and MDLM use <|endoftext|> for both)."""
    bos = getattr(tokenizer, "bos_id", None)
    return tokenizer.eos_id if bos is None else int(bos)


def encode_docs(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """The token stream of ``docs`` (int32): each document then EOS (both layouts; MDLM appends EOS
    only, the row's BOS comes when the stream is cut)."""
    pieces = [ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(list(docs))]
    if not pieces:
        return np.empty(0, dtype=np.int32)
    return np.fromiter((i for p in pieces for i in p), dtype=np.int32, count=sum(map(len, pieces)))


class Packer:
    """Cut a token stream into rows of ``seq_len`` (wrapped rows: [BOS] + seq_len - 2 tokens + [EOS])."""

    def __init__(self, seq_len: int, eos: int, bos: int, wrap: bool, dtype: np.dtype | type = np.int32):
        self.seq_len, self.eos, self.bos, self.wrap = seq_len, eos, bos, wrap
        self.chunk = seq_len - 2 if wrap else seq_len
        if self.chunk < 1:
            raise ValueError(f"data.seq_len={seq_len} leaves no room between [BOS] and [EOS]")
        self.dtype = np.dtype(dtype)
        self.carry = np.empty(0, dtype=np.int32)

    def add(self, stream: np.ndarray) -> np.ndarray:
        """Rows [n, seq_len] completed by this piece of the stream (n may be 0)."""
        flat = np.concatenate([self.carry, stream]) if self.carry.size else stream
        n = flat.size // self.chunk
        self.carry = flat[n * self.chunk:].copy()
        body = flat[:n * self.chunk].reshape(n, self.chunk)
        if not self.wrap:
            return body.astype(self.dtype, copy=False)
        rows = np.empty((n, self.seq_len), dtype=self.dtype)
        rows[:, 0], rows[:, -1] = self.bos, self.eos
        rows[:, 1:-1] = body
        return rows

    def end_group(self) -> None:
        """Drop the partial chunk: the next tokens start a new row (MDLM's per-group remainder)."""
        self.carry = np.empty(0, dtype=np.int32)


@dataclass(frozen=True)
class Part:
    """A run of consecutive documents packed on its own: ``docs`` of them (-1: all that remain),
    at most ``max_rows`` rows (0: no cap; the rest of its documents are then read and skipped)."""

    name: str
    docs: int = -1
    max_rows: int = 0


# --------------------------------------------------------------------------------------------------
# Parallel tokenisation
# --------------------------------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(spec: str) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: the pool is the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tok=load_tokenizer(spec))


def _encode_task(docs: list[str]) -> tuple[np.ndarray, int]:
    return encode_docs(_worker["tok"], docs), sum(len(d.encode("utf-8")) for d in docs)


def encode_stream(batches: Iterable[tuple[object, list[str]]], tokenizer_spec: str,
                  workers: int) -> Iterator[tuple[object, np.ndarray, int]]:
    """(tag, token stream piece, UTF-8 bytes of text it came from) per tagged batch, in order.

    ``workers`` <= 1 tokenises in this process (the Rust tokenizers may still use threads); more
    starts that many processes (spawned: no fork of a process that holds torch or threads).
    """
    if workers <= 1:
        tok = load_tokenizer(tokenizer_spec)
        for tag, b in batches:
            yield tag, encode_docs(tok, b), sum(len(d.encode("utf-8")) for d in b)
        return
    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                  initargs=(tokenizer_spec,))
    inflight: collections.deque[tuple[object, cf.Future]] = collections.deque()
    try:
        for tag, b in batches:
            inflight.append((tag, pool.submit(_encode_task, b)))
            if len(inflight) >= 2 * workers:
                tag0, fut = inflight.popleft()
                yield (tag0, *fut.result())
        while inflight:
            tag0, fut = inflight.popleft()
            yield (tag0, *fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(docs: Iterator[str], parts: Sequence[Part], group_docs: int, full: Callable[[int], bool],
             counted: list[int]) -> Iterator[tuple[tuple[int, bool], list[str]]]:
    """((part index, ends a group), documents) batches of at most BATCH_DOCS that never straddle a
    part or a group of ``group_docs`` (0: no groups) counted from the part's first document.
    Documents of a part that is ``full`` are read (to reach the next part) but not sent; once the
    last part is full, reading stops. ``counted[k]`` is how many documents part k read."""
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        batch: list[str] = []
        i = 0
        while part.docs < 0 or i < part.docs:
            if last and full(k):
                return
            doc = next(docs, None)
            if doc is None:
                break
            i += 1
            counted[k] = i
            if full(k):
                continue
            batch.append(doc)
            group_end = bool(group_docs) and i % group_docs == 0
            if group_end or len(batch) == BATCH_DOCS:
                yield (k, group_end), batch
                batch = []
        if batch:
            yield (k, True), batch


def pack_parts(docs: Iterable[str], parts: Sequence[Part], tokenizer_spec: str, tokenizer: Tokenizer, seq_len: int,
               *, wrap: bool = False, workers: int = 1, dtype: np.dtype | type = np.int32, progress: bool = False,
               stats: dict | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(part index, block of rows [k, seq_len] of ``dtype``), parts in order. ``stats`` receives
    ``bytes`` (text tokenised), ``tokens`` (stream length), ``rows`` and ``docs`` (documents read),
    the last two per part."""
    from tqdm.auto import tqdm

    packers = [Packer(seq_len, tokenizer.eos_id, bos_id(tokenizer), wrap, dtype) for _ in parts]
    st = stats if stats is not None else {}
    st.update(bytes=0, tokens=0, rows=[0] * len(parts), docs=[0] * len(parts))
    caps = [p.max_rows for p in parts]

    def full(k: int) -> bool:
        return bool(caps[k]) and st["rows"][k] >= caps[k]

    batches = _batches(iter(docs), parts, WRAP_GROUP_DOCS if wrap else 0, full, st["docs"])
    with tqdm(desc="tokenise+pack", unit="B", unit_scale=True, disable=not progress, mininterval=2) as bar:
        for (k, group_end), piece, nbytes in encode_stream(batches, tokenizer_spec, workers):
            rows = packers[k].add(piece)
            if wrap and group_end:
                packers[k].end_group()
            st["bytes"] += nbytes
            st["tokens"] += int(piece.size)
            bar.update(nbytes)
            if caps[k]:
                rows = rows[:max(caps[k] - st["rows"][k], 0)]
            if rows.size:
                st["rows"][k] += rows.shape[0]
                bar.set_postfix(rows=sum(st["rows"]), refresh=False)
                yield k, rows


def pack_stream(docs: Iterable[str], tokenizer_spec: str, tokenizer: Tokenizer, seq_len: int, *, wrap: bool = False,
                workers: int = 1, max_rows: int = 0, dtype: np.dtype | type = np.int32,
                progress: bool = False, stats: dict | None = None) -> Iterator[np.ndarray]:
    """All documents as one part: blocks of rows [k, seq_len] of ``dtype``; stops reading after
    ``max_rows`` rows when > 0. ``stats`` as ``pack_parts``'s, with single numbers."""
    st: dict = {}
    try:
        for _, rows in pack_parts(docs, [Part("all", -1, max_rows)], tokenizer_spec, tokenizer, seq_len,
                                  wrap=wrap, workers=workers, dtype=dtype, progress=progress, stats=st):
            yield rows
    finally:
        if stats is not None and st:
            stats.update(st, rows=st["rows"][0], docs=st["docs"][0])
