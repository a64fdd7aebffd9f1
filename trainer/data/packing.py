"""Tokenise documents in parallel and pack them into fixed-length rows, streaming, in bounded memory.

Documents are read in the calling process and sent in batches to ``workers`` tokeniser processes;
results come back in submission order (so the rows do not depend on the number of workers) with at
most ``2 x workers`` batches in flight, and a ``Packer`` cuts the token stream into rows as it
arrives. Memory is a few batches of text plus one row of carry, whatever the corpus size.

Two layouts (``data.wrap``):
- unwrapped (default): every document is followed by EOS; the stream is cut into rows of L tokens;
- wrapped (MDLM's ``wrap``, how mdlm-owt was trained): every document is ``[BOS] doc [EOS]``; the
  stream is cut into chunks of L - 2 tokens and each row is ``[BOS] chunk [EOS]``. For GPT-2,
  BOS = EOS = ``<|endoftext|>`` (50256), as in MDLM.
The final partial row is dropped in both.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from trainer.data.tokenizers import Tokenizer, load_tokenizer

BATCH_DOCS = 256  # documents per task sent to a worker


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits, else int32: half the disk and page cache for GPT-2."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def bos_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's BOS if it has one, else its EOS (GPT-2 and MDLM use <|endoftext|> for both)."""
    bos = getattr(tokenizer, "bos_id", None)
    return tokenizer.eos_id if bos is None else int(bos)


def encode_docs(tokenizer: Tokenizer, docs: Sequence[str], wrap: bool) -> np.ndarray:
    """The token stream of ``docs`` (int32): each doc then EOS, or [BOS] doc [EOS] when wrapped."""
    pieces: list[list[int]] = []
    head = [bos_id(tokenizer)] if wrap else []
    for ids in tokenizer.encode_batch(list(docs)):
        pieces.append(head + ids + [tokenizer.eos_id])
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


# --------------------------------------------------------------------------------------------------
# Parallel tokenisation
# --------------------------------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(spec: str, wrap: bool) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: the pool is the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tok=load_tokenizer(spec), wrap=wrap)


def _encode_task(docs: list[str]) -> tuple[np.ndarray, int]:
    return encode_docs(_worker["tok"], docs, _worker["wrap"]), sum(len(d.encode("utf-8")) for d in docs)


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_stream(docs: Iterable[str], tokenizer_spec: str, wrap: bool, workers: int,
                  batch_docs: int = BATCH_DOCS) -> Iterator[tuple[np.ndarray, int]]:
    """(token stream piece, UTF-8 bytes of text it came from) per batch of documents, in order.

    ``workers`` <= 1 tokenises in this process (the Rust tokenizers may still use threads); more
    starts that many processes (spawned: no fork of a process that holds torch or threads).
    """
    batches = _batched(docs, batch_docs)
    if workers <= 1:
        tok = load_tokenizer(tokenizer_spec)
        for b in batches:
            yield encode_docs(tok, b, wrap), sum(len(d.encode("utf-8")) for d in b)
        return
    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                  initargs=(tokenizer_spec, wrap))
    inflight: collections.deque[cf.Future] = collections.deque()
    try:
        for b in batches:
            inflight.append(pool.submit(_encode_task, b))
            if len(inflight) >= 2 * workers:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pack_stream(docs: Iterable[str], tokenizer_spec: str, tokenizer: Tokenizer, seq_len: int, *, wrap: bool = False,
                workers: int = 1, max_rows: int = 0, dtype: np.dtype | type = np.int32,
                progress: bool = False, stats: dict | None = None) -> Iterator[np.ndarray]:
    """Blocks of rows [k, seq_len] of ``dtype``; stops after ``max_rows`` rows when > 0. ``stats``
    receives ``bytes`` (text read), ``tokens`` (stream length) and ``rows``."""
    from tqdm.auto import tqdm

    packer = Packer(seq_len, tokenizer.eos_id, bos_id(tokenizer), wrap, dtype)
    st = stats if stats is not None else {}
    st.update(bytes=0, tokens=0, rows=0)
    with tqdm(desc="tokenise+pack", unit="B", unit_scale=True, disable=not progress, mininterval=2) as bar:
        for piece, nbytes in encode_stream(docs, tokenizer_spec, wrap, workers):
            rows = packer.add(piece)
            st["bytes"] += nbytes
            st["tokens"] += int(piece.size)
            bar.update(nbytes)
            if max_rows:
                rows = rows[:max_rows - st["rows"]]
            if rows.size:
                st["rows"] += rows.shape[0]
                bar.set_postfix(rows=st["rows"], refresh=False)
                yield rows
            if max_rows and st["rows"] >= max_rows:
                return
