"""Corpora -> fixed-length token sequences, prepared once and read by every later job.

Three sources (``DataConfig.source``):
- ``synthetic``: a seeded sparse first-order Markov chain with a small uniform leak (``MarkovSource``)
  whose likelihood, entropy rate and bigram law are exact, so model quality is measured against the
  truth, not a proxy;
- ``text``: local ``.txt`` (one document per file) and ``.jsonl`` (one document per line) files;
- ``hf``: a Hugging Face dataset by name (optional ``datasets`` package, cache or hub).

Text is tokenised, each document followed by EOS, concatenated and cut into rows of ``seq_len``.
``prepare_data`` writes ``train.npy``/``valid.npy`` (int32 [N, L]) and then ``data.json`` (what made
them and a sha256 digest); every file appears by an atomic rename and data.json comes last, so a
reader that finds data.json finds complete arrays. ``batches`` turns the train array into the
deterministic, resumable per-rank stream the training loops consume.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import DataConfig, SyntheticConfig
from trainer.data.tokenizers import Tokenizer, load_tokenizer
from trainer.errors import BadInput
from trainer.fileio import atomic_write_json

FORMAT_VERSION = 1  # bump when the meaning of prepared files or of their inputs changes
SPLITS = ("train", "valid")


class DataError(BadInput, ValueError):
    """Bad or missing data; the message names the file, glob or config key."""


# --------------------------------------------------------------------------------------------------
# The synthetic source
# --------------------------------------------------------------------------------------------------
# Above this vocabulary the transition matrix is not materialised: the stationary law comes from
# sparse power iteration and dense tables are refused (50k^2 float64 would be 20 GB).
DENSE_MAX_VOCAB = 2048
# Dirichlet draws with a small concentration underflow to exactly 0; raising them to this floor keeps
# every listed successor a real edge, so the irreducibility/aperiodicity checks mean something.
_MIN_PROB = 1e-12
_MAX_REDRAWS = 100
_POWER_TOL = 1e-13
_POWER_MAX_ITERS = 200_000


class MarkovSource:
    """A seeded first-order Markov chain over ``vocab_size`` states (= tokens): sparse plus a leak.

    Row i is P_i = (1 - leak) S_i + leak / V, where S_i puts Dirichlet(``concentration``) weights on
    ``branching`` distinct successors. One successor of every state lies on a random Hamiltonian
    cycle through all states, so S alone is irreducible; with ``branching >= 2`` the successor sets
    are re-drawn until S is also aperiodic (``branching == 1`` is the cycle itself, periodic, but with
    a unique uniform stationary law). Sequences start from the stationary law of P, so every position
    is stationary and consecutive pairs follow ``bigram_distribution`` exactly.

    Sparse form (float64): ``succ[i, k]`` is the k-th successor of state i and ``probs[i, k]`` its
    weight in S; ``stationary`` is the stationary law of P. Nothing V x V is built unless asked for
    (and then only up to vocab 2048), so a GPT-2-sized vocabulary works.
    """

    def __init__(self, cfg: SyntheticConfig):
        if (cfg.vocab_size < 2 or not 1 <= cfg.branching <= cfg.vocab_size or cfg.concentration <= 0
                or not 0 <= cfg.leak < 1):
            raise DataError(f"bad data.synthetic: vocab_size={cfg.vocab_size}, branching={cfg.branching}, "
                            f"concentration={cfg.concentration}, leak={cfg.leak}")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.leak = cfg.leak
        rng = np.random.default_rng(cfg.seed)
        for _ in range(_MAX_REDRAWS):
            succ, probs = _draw_chain(cfg.vocab_size, cfg.branching, cfg.concentration, rng)
            if cfg.branching == 1 or _period(succ) == 1:
                break
        else:
            raise DataError(f"data.synthetic: no aperiodic chain in {_MAX_REDRAWS} draws "
                            f"(vocab_size={cfg.vocab_size}, branching={cfg.branching})")
        self.succ: np.ndarray = succ
        self.probs: np.ndarray = probs
        # Cumulative rows with an exact 1.0 at the end: a uniform u in (0, 1] always finds a successor.
        self._cum = np.cumsum(probs, axis=1)
        self._cum[:, -1] = 1.0
        self.stationary: np.ndarray = (self._stationary_dense() if self.vocab_size <= DENSE_MAX_VOCAB
                                       else self._stationary_power())
        self._cum_stationary = np.cumsum(self.stationary)
        self._cum_stationary[-1] = 1.0
        with np.errstate(divide="ignore"):
            self._log_stationary = np.log(self.stationary)

    # -- sampling and likelihood ---------------------------------------------------------------
    def sample(self, n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` independent sequences of length ``seq_len`` (int64 [n, seq_len])."""
        out = np.empty((n, seq_len), dtype=np.int64)
        # u in (0, 1]: the index of the first cumulative value >= u has exactly its own probability.
        out[:, 0] = np.searchsorted(self._cum_stationary, 1.0 - rng.random(n), side="left")
        for t in range(1, seq_len):
            state = out[:, t - 1]
            u = 1.0 - rng.random(n)
            nxt = self.succ[state, (self._cum[state] < u[:, None]).sum(axis=1)]
            if self.leak > 0:
                jump = rng.random(n) < self.leak
                nxt = np.where(jump, rng.integers(0, self.vocab_size, n), nxt)
            out[:, t] = nxt
        return out

    def log_prob(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Exact log-likelihood of each sequence (float64 [n]); -inf only if leak = 0 and a
        transition is not in the sparse support."""
        x = self._check_tokens(seqs)
        out = np.empty(x.shape[0], dtype=np.float64)
        # Chunk the rows: the successor match below is [rows, L - 1, branching] wide.
        rows = max(1, (1 << 22) // max(1, x.shape[1] * self.cfg.branching))
        for i in range(0, x.shape[0], rows):
            out[i:i + rows] = self._log_prob_rows(x[i:i + rows])
        return out

    def _log_prob_rows(self, x: np.ndarray) -> np.ndarray:
        prev, nxt = x[:, :-1], x[:, 1:]
        sparse = np.where(self.succ[prev] == nxt[..., None], self.probs[prev], 0.0).sum(axis=-1)
        with np.errstate(divide="ignore"):
            step = np.log((1.0 - self.leak) * sparse + self.leak / self.vocab_size)
        return self._log_stationary[x[:, 0]] + step.sum(axis=1)

    def nll_per_token(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Negative log-likelihood per token, nats (float64 [n])."""
        x = self._check_tokens(seqs)
        return -self.log_prob(x) / x.shape[1]

    def _check_tokens(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        x = seqs.detach().cpu().numpy() if isinstance(seqs, torch.Tensor) else np.asarray(seqs)
        if x.ndim != 2 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"Markov source: expected an integer array [n, L], got {x.dtype} {x.shape}")
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise DataError(f"Markov source: token ids must lie in [0, {self.vocab_size}); got "
                            f"[{x.min()}, {x.max()}] (a MASK id left in a sample?)")
        return x.astype(np.int64, copy=False)

    # -- exact information quantities ------------------------------------------------------------
    @property
    def entropy_rate(self) -> float:
        """sum_i pi_i H(P_i), nats per token: the per-token NLL floor of a long sequence."""
        v, eps = self.vocab_size, self.leak
        listed = (1.0 - eps) * self.probs + eps / v
        row_entropy = -(listed * np.log(listed)).sum(axis=1)
        if eps > 0:  # the V - branching states a row reaches by the leak alone
            row_entropy -= (v - self.cfg.branching) * (eps / v) * math.log(eps / v)
        return float(self.stationary @ row_entropy)

    @property
    def stationary_entropy(self) -> float:
        """H(pi), nats: the entropy of the first token."""
        pi = self.stationary[self.stationary > 0]
        return float(-(pi * np.log(pi)).sum())

    def sequence_entropy_per_token(self, seq_len: int) -> float:
        """(H(pi) + (L - 1) h) / L: the exact expected per-token NLL of a true sample of length L,
        the floor a perfect model reaches."""
        return (self.stationary_entropy + (seq_len - 1) * self.entropy_rate) / seq_len

    def transition_matrix(self) -> np.ndarray:
        """P as a dense float64 [V, V] table (vocabularies up to 2048)."""
        v = self.vocab_size
        if v > DENSE_MAX_VOCAB:
            raise DataError(f"Markov source: vocab_size={v} is too large for a dense [V, V] table; "
                            f"use the sparse succ/probs/stationary arrays")
        p = np.full((v, v), self.leak / v)
        rows = np.repeat(np.arange(v), self.cfg.branching)
        p[rows, self.succ.ravel()] += (1.0 - self.leak) * self.probs.ravel()  # successors are distinct
        return p

    def bigram_distribution(self) -> np.ndarray:
        """The stationary joint law of consecutive tokens, pi_i P_ij (dense float64 [V, V])."""
        return self.stationary[:, None] * self.transition_matrix()

    def _stationary_dense(self) -> np.ndarray:
        """Exact solve of pi (P - I) = 0 with sum(pi) = 1 (one balance equation is redundant)."""
        v = self.vocab_size
        a = self.transition_matrix().T - np.eye(v)
        a[-1] = 1.0
        rhs = np.zeros(v)
        rhs[-1] = 1.0
        pi = np.clip(np.linalg.solve(a, rhs), 0.0, None)  # rounding can leave -1e-18 on rare states
        return pi / pi.sum()

    def _stationary_power(self) -> np.ndarray:
        """Sparse power iteration pi <- pi P from uniform. It converges: P is aperiodic, or it is the
        deterministic cycle, whose stationary law is the uniform start."""
        v, eps = self.vocab_size, self.leak
        pi = np.full(v, 1.0 / v)
        for _ in range(_POWER_MAX_ITERS):
            flow = np.bincount(self.succ.ravel(), weights=(pi[:, None] * self.probs).ravel(), minlength=v)
            new = (1.0 - eps) * flow + eps / v
            new /= new.sum()
            if np.abs(new - pi).sum() < _POWER_TOL:
                return new
            pi = new
        raise DataError(f"data.synthetic: the chain mixes too slowly to find its stationary law in "
                        f"{_POWER_MAX_ITERS} iterations; raise branching, concentration or leak")


def _draw_chain(vocab: int, branching: int, concentration: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(vocab)
    cycle_next = np.empty(vocab, dtype=np.int64)
    cycle_next[order] = np.roll(order, -1)
    succ = np.empty((vocab, branching), dtype=np.int64)
    succ[:, 0] = cycle_next
    if branching > 1:
        for i in range(vocab):
            # Draw from the V - 1 states other than the cycle successor (self-loops allowed).
            others = rng.choice(vocab - 1, size=branching - 1, replace=False)
            succ[i, 1:] = others + (others >= cycle_next[i])
    probs = rng.dirichlet(np.full(branching, concentration), size=vocab)
    probs = np.maximum(probs, _MIN_PROB)
    return succ, probs / probs.sum(axis=1, keepdims=True)


def _period(succ: np.ndarray) -> int:
    """Period of an irreducible chain's graph: gcd over edges u->v of level(u) + 1 - level(v), with
    levels the breadth-first distances from state 0."""
    level = np.full(succ.shape[0], -1, dtype=np.int64)
    level[0] = 0
    frontier, depth = np.array([0]), 0
    while frontier.size:
        depth += 1
        nbrs = np.unique(succ[frontier])
        frontier = nbrs[level[nbrs] < 0]
        level[frontier] = depth
    return int(np.gcd.reduce(np.abs(level[:, None] + 1 - level[succ]).ravel()))


# --------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------
_TEXT_SUFFIXES = (".txt", ".jsonl")


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files matched by the globs, each pattern's matches sorted (a stable document order)."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise DataError(f"data.paths: glob '{pattern}' matches no file")
        for m in matches:
            if m.suffix not in _TEXT_SUFFIXES:
                raise DataError(f"data.paths: {m} is neither .txt nor .jsonl")
            if m not in files:
                files.append(m)
    return files


def iter_text_documents(files: Sequence[Path], text_field: str) -> Iterator[str]:
    """A ``.txt`` file is one document; a ``.jsonl`` line is one document (its ``text_field``)."""
    for path in files:
        try:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
                continue
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield _jsonl_text(line, text_field, f"{path}:{lineno}")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from None


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e}") from None
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{where}: no field '{text_field}' (data.text_field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{text_field}' is {type(text).__name__}, not a string")
    return text


def iter_hf_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of a Hugging Face dataset (``data.hf_name``), from the local cache or the hub."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=hf needs the optional 'datasets' package: install the project's "
                        "'hf' extra (pip install -e '.[hf]') or 'pip install datasets'") from None
    what = f"'{cfg.hf_name}' (config '{cfg.hf_config or 'default'}', split '{cfg.hf_split}')"
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=cfg.hf_split)
    except Exception as e:  # offline, not cached, unknown name or split: all end the same way here
        raise DataError(f"data.hf_name: cannot load Hugging Face dataset {what}: {type(e).__name__}: {e}. "
                        f"Without network access it must already be in the local Hugging Face cache "
                        f"(HF_HOME / HF_DATASETS_CACHE); HF_DATASETS_OFFLINE=1 reads the cache only") from None
    if cfg.text_field not in ds.column_names:
        raise DataError(f"data.text_field: dataset {what} has no column '{cfg.text_field}' "
                        f"(columns: {', '.join(ds.column_names)})")
    for batch in ds.iter(batch_size=1024):
        for text in batch[cfg.text_field]:
            if not isinstance(text, str):
                raise DataError(f"data.text_field: dataset {what} has a non-string '{cfg.text_field}'")
            yield text


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------
_ENCODE_BATCH = 512  # documents per tokenizer call (the Rust tokenizers parallelise a batch)


def pack_documents(docs: Iterable[str], tokenizer: Tokenizer, seq_len: int,
                   max_rows: int = 0) -> Iterator[np.ndarray]:
    """Tokenise, append EOS after each document, concatenate and cut into rows of ``seq_len``.

    Yields int32 blocks [k, seq_len]; the final partial row is dropped. With ``max_rows > 0`` it
    stops after that many rows (so a capped run does not tokenise a whole corpus).
    """
    carry = np.empty(0, dtype=np.int32)
    emitted = 0
    batch: list[str] = []

    def flush() -> np.ndarray:
        nonlocal carry, emitted
        ids = [np.asarray(t + [tokenizer.eos_id], dtype=np.int32) for t in tokenizer.encode_batch(batch)]
        batch.clear()
        flat = np.concatenate([carry, *ids])
        n = flat.size // seq_len
        if max_rows:
            n = min(n, max_rows - emitted)
        carry = flat[n * seq_len:]
        emitted += n
        return flat[:n * seq_len].reshape(n, seq_len)

    for doc in docs:
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            block = flush()
            if block.size:
                yield block
            if max_rows and emitted >= max_rows:
                return
    if batch:
        block = flush()
        if block.size:
            yield block


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


def prepare_data(cfg: DataConfig, out_dir: str | Path) -> Path:
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
            for split in SPLITS:
                load_split(out, split)  # present and of the recorded shape, or a clear error
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
        info = _prepare_text(cfg, tokenizer, out)
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
    common.update(tokenizer=tokenizer.name, text_field=cfg.text_field)
    if cfg.source == "text":
        # Path and size, not content: hashing a large corpus on every job start would cost minutes.
        files = [[str(p.resolve()), p.stat().st_size] for p in expand_paths(cfg.paths)]
        return dict(common, files=files)
    if cfg.source == "hf":
        return dict(common, hf_name=cfg.hf_name, hf_config=cfg.hf_config, hf_split=cfg.hf_split)
    raise DataError(f"data.source: unknown source '{cfg.source}'")


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

    digest = _write_splits(out, cfg.seq_len, {s: (counts[s], blocks(s)) for s in SPLITS})
    s = cfg.synthetic
    return dict(
        source=(f"synthetic Markov chain (vocab {s.vocab_size}, branching {s.branching}, "
                f"concentration {s.concentration}, leak {s.leak}, seed {s.seed})"),
        tokenizer="synthetic", vocab_size=s.vocab_size, eos_id=None,
        num_train=counts["train"], num_valid=counts["valid"], digest=digest,
        entropy_rate=source.entropy_rate,
        sequence_entropy_per_token=source.sequence_entropy_per_token(cfg.seq_len),
    )


def _prepare_text(cfg: DataConfig, tokenizer: Tokenizer, out: Path) -> dict[str, Any]:
    if cfg.source == "text":
        files = expand_paths(cfg.paths)
        docs = iter_text_documents(files, cfg.text_field)
        description = f"text: {len(files)} files from {', '.join(cfg.paths)}"
    else:
        docs = iter_hf_documents(cfg)
        description = f"hf: {cfg.hf_name}" + (f"/{cfg.hf_config}" if cfg.hf_config else "") + \
            f" split {cfg.hf_split}"
    max_rows = cfg.num_train_sequences + cfg.num_valid_sequences if cfg.num_train_sequences > 0 else 0
    # Pack into a flat scratch file first: the corpus size is unknown until the end and may not fit
    # in memory; the split then copies rows out of its memory map.
    scratch = out / f".packed.{os.getpid()}.tmp"
    n_rows = 0
    try:
        with scratch.open("wb") as f:
            for block in pack_documents(docs, tokenizer, cfg.seq_len, max_rows):
                f.write(block.tobytes())
                n_rows += block.shape[0]
        if n_rows == 0:
            raise DataError(f"data.source={cfg.source}: {description} gives no complete sequence of "
                            f"data.seq_len={cfg.seq_len} tokens")
        packed = np.memmap(scratch, dtype=np.int32, mode="r", shape=(n_rows, cfg.seq_len))
        train_idx, valid_idx = split_indices(n_rows, cfg.num_valid_sequences, cfg.num_train_sequences,
                                             cfg.seed)

        def blocks(idx: np.ndarray) -> Iterator[np.ndarray]:
            for start in range(0, idx.size, _ROWS_PER_WRITE):
                yield np.asarray(packed[idx[start:start + _ROWS_PER_WRITE]])  # noqa: F821 (deleted below, after use)

        digest = _write_splits(out, cfg.seq_len, {"train": (train_idx.size, blocks(train_idx)),
                                                  "valid": (valid_idx.size, blocks(valid_idx))})
        del packed  # the memmap must close before the scratch file is unlinked
    finally:
        scratch.unlink(missing_ok=True)
    return dict(source=description, tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                eos_id=tokenizer.eos_id, num_train=int(train_idx.size), num_valid=int(valid_idx.size),
                num_packed=n_rows, digest=digest)


def _write_splits(out: Path, seq_len: int, splits: dict[str, tuple[int, Iterable[np.ndarray]]]) -> str:
    """Write each split to a temporary .npy, hashing the rows as they go, then rename all of them.
    Returns the digest: sha256 over (name, shape, dtype, C-order bytes) of each split in order."""
    digest = hashlib.sha256()
    tmp_paths = {}
    for split, (n, blocks) in splits.items():
        tmp = out / f".{split}.{os.getpid()}.tmp"
        tmp_paths[split] = tmp
        digest.update(f"{split}:{n}x{seq_len}:int32;".encode())
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n, seq_len))
        row = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.int32)
            arr[row:row + block.shape[0]] = block
            digest.update(block.tobytes())
            row += block.shape[0]
        if row != n:
            raise RuntimeError(f"{tmp}: wrote {row} rows, expected {n}")
        arr.flush()
        del arr
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


def load_split(out_dir: str | Path, split: str) -> np.ndarray:
    """A prepared split as a read-only memory map (int32 [N, L]), checked against data.json."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    info = load_data_info(out_dir)
    path = Path(out_dir) / f"{split}.npy"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} not found, though data.json lists it; prepare the data again") from None
    except (ValueError, OSError) as e:  # bad header, truncated data
        raise DataError(f"{path}: corrupt token file: {e}") from None
    expected = (info[f"num_{split}"], info["seq_len"])
    if arr.dtype != np.int32 or arr.shape != expected:
        raise DataError(f"{path}: holds {arr.dtype} {arr.shape}, data.json says int32 {expected}")
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

