"""Target codecs: how a teacher distribution over the vocabulary is stored for each masked position.

An SDTT target is a full distribution over V tokens at every masked position; with GPT-2's vocabulary
that is ~200 KB per position in fp32, so the offline target set needs a sparse code
(measured trade-offs: docs/benchmarks.md, storage). Three codecs, chosen by ``targets.codec``:

``dense``
    ``logp`` fp32 [M, V]. Exact. For tests and small vocabularies.
``topk``
    ``ids`` [M, K] (the K most likely tokens, by decreasing probability, ties by increasing id),
    ``logp`` fp16 [M, K] (their log-probs) and ``logtail`` fp32 [M]: the log of the residual mass
    1 - sum(top-K) outside the stored ids, computed in float64 as a log-sum-exp over the non-stored
    log-probs (not as 1 - sum, which cancels), so it stays accurate when the tail is tiny; -inf when
    K = V. Decoding spreads the tail mass uniformly over the V - K non-stored tokens.
``topk_is``
    ``topk``'s three fields plus K importance-sampled tail ids: ``tail_ids`` [M, K] drawn with
    replacement from the teacher's tail law (its distribution renormalised over the V - K non-stored
    ids; float64 inverse CDF, from the sample's generator) and ``tail_logp`` fp16 [M, K], the teacher's
    log-probs there. Where ``topk`` only knows the tail's total mass, these give an unbiased estimate
    of how the student's tail shape differs from the teacher's (trainer/method/divergences.py), so a student
    cannot collapse its tail for free. Twice ``topk``'s bytes at the same K. With K = V (no tail) the
    tail fields hold id 0 and -inf.
``sampled``
    Random-Sampling KD (Anshumann et al. 2025): K draws with replacement from the teacher
    distribution (float64 inverse-CDF), stored ragged as the distinct ids with their counts:
    ``ids`` [U] (grouped by position, increasing id), ``counts`` [U], ``nuniq`` [M] (distinct ids per
    position, sum = U). The decoded estimate is p_hat(v) = count(v) / K: E[p_hat] = p exactly
    (unbiased), with variance p (1 - p) / K. A peaked distribution needs few distinct ids, which is
    where the saving comes from; the worst case is U = K per position.

All codecs encode only the M masked positions of a sequence, in position order. Ids are stored as
uint16 when the vocabulary fits (V <= 65,536, GPT-2 included: 2 bytes instead of 4 per id) and as
int32 otherwise; ``decode`` always returns int64. Counts and ``nuniq`` are uint8 when K <= 255.

Only npy-friendly numeric arrays: a shard never needs pickle. The divergences that go with each code
live in trainer/method/divergences.py, so the pairing is tested in one place.

``python tools/inspect_shards.py --sizes [--config FILE]`` prints bytes per stored position.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trainer.config import Codec, choice_names
from trainer.errors import BadInput

CODECS = choice_names(Codec)  # declared in trainer/config.py
GPT2_VOCAB = 50257

# Field names each codec writes (besides the per-sample ``xt.npy`` and ``meta.json``).
FIELDS: dict[str, tuple[str, ...]] = {
    "dense": ("logp",),
    "topk": ("ids", "logp", "logtail"),
    "topk_is": ("ids", "logp", "logtail", "tail_ids", "tail_logp"),
    "sampled": ("ids", "counts", "nuniq"),
}


class CodecError(BadInput, ValueError):
    """A code that cannot be encoded or decoded; the message names the codec and the field."""


# --------------------------------------------------------------------------------------------------
# Storage dtypes and sizes
# --------------------------------------------------------------------------------------------------
def id_dtype(vocab: int) -> np.dtype:
    """uint16 when every real id (< vocab) fits, else int32."""
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)


def count_dtype(k: int) -> np.dtype:
    """Holds counts in [0, K] (and distinct-id counts, also <= K)."""
    if k <= 255:
        return np.dtype(np.uint8)
    if k <= 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def bytes_per_position(codec: str, k: int, vocab: int, distinct: float | None = None) -> float:
    """Payload bytes stored per masked position (codec fields only; npy/tar headers not included).

    For ``sampled`` the size depends on the number of distinct ids per position: pass the mean
    ``distinct`` (measured, or ``expected_distinct``); by default the worst case, K distinct ids.
    """
    _check_codec(codec)
    if codec == "dense":
        return 4.0 * vocab
    ib = id_dtype(vocab).itemsize
    if codec == "topk":
        return k * (ib + 2) + 4.0  # ids + fp16 log-probs, + fp32 log tail mass
    if codec == "topk_is":
        return 2 * k * (ib + 2) + 4.0  # top-K and K tail draws (ids + fp16 log-probs), + log tail mass
    cb = count_dtype(k).itemsize
    u = float(k) if distinct is None else float(distinct)
    return u * (ib + cb) + cb  # distinct ids + their counts, + the per-position distinct count


def expected_distinct(probs: Tensor, k: int) -> Tensor:
    """Expected number of distinct ids among K draws from each row of ``probs`` [..., V]:
    sum_v 1 - (1 - p_v)^K (exact, float64)."""
    p = probs.double()
    return (1.0 - torch.exp(k * torch.log1p(-p.clamp(max=1.0)))).sum(-1)


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise CodecError(f"unknown codec '{codec}' (expected one of {', '.join(CODECS)})")


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------
def encode(log_probs: Tensor, codec: str, k: int, generator: torch.Generator | None = None
           ) -> dict[str, np.ndarray]:
    """Encode the teacher log-probs [M, V] (real tokens only, MASK column dropped) of M positions.

    ``generator`` (a CPU generator) is needed by ``sampled`` only; nothing else is random.
    """
    _check_codec(codec)
    if log_probs.dim() != 2:
        raise CodecError(f"{codec}: expected log-probs [M, V], got shape {tuple(log_probs.shape)}")
    m, vocab = log_probs.shape
    if codec == "dense":
        return {"logp": log_probs.float().cpu().numpy().astype(np.float32, copy=False)}
    if not 1 <= k <= (vocab if codec in ("topk", "topk_is") else 1 << 30):
        raise CodecError(f"{codec}: k={k} must be in [1, {vocab}]")
    if codec == "topk":
        return _encode_topk(log_probs, k, vocab)
    if generator is None:
        raise CodecError(f"{codec}: a torch.Generator is required (the draws must be reproducible)")
    if codec == "topk_is":
        return _encode_topk_is(log_probs, k, vocab, generator)
    return _encode_sampled(log_probs, k, vocab, generator)


def encode_rows(log_probs: Tensor, rows: Sequence[int], codec: str, k: int,
                generators: Sequence[torch.Generator] | None = None) -> list[dict[str, np.ndarray]]:
    """Encode the masked positions of a batch: ``log_probs`` [N, V] holds sample b's ``rows[b]``
    positions after sample a's for a < b; returns one field dict per sample.

    The deterministic codecs (topk, dense) encode every row in one call and split the result: one
    top-K and three device-to-host copies per batch instead of per sample (on a GPU each copy is a
    synchronisation). ``sampled`` encodes sample by sample with ``generators[b]``, so its draws do
    not depend on the batch.
    """
    if sum(rows) != log_probs.shape[0]:
        raise CodecError(f"{codec}: {log_probs.shape[0]} rows of log-probs for {sum(rows)} positions")
    if codec in ("sampled", "topk_is"):
        if generators is None or len(generators) != len(rows):
            raise CodecError(f"{codec}: one torch.Generator per sample is required")
        return [encode(part, codec, k, g) for part, g in zip(log_probs.split(list(rows)), generators)]
    fields = encode(log_probs, codec, k)
    bounds = np.cumsum([0, *rows])
    return [{name: arr[a:b] for name, arr in fields.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def _encode_topk(log_probs: Tensor, k: int, vocab: int) -> dict[str, np.ndarray]:
    lp = log_probs.detach().float()  # on its device: a GPT-2-sized row is 50k wide
    top, ids = torch.topk(lp, k, dim=-1)
    # Canonical order inside the selection: decreasing value, ties by increasing id (torch.topk
    # promises no tie order). Which of several tied tokens at the K-th place gets in is up to
    # topk; real teacher log-probs practically never tie there.
    ids, perm = ids.sort(dim=-1)
    top, perm = top.gather(-1, perm).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, perm)
    if k < vocab:
        logtail = torch.logsumexp(lp.scatter(-1, ids, -math.inf).double(), dim=-1).float()
    else:
        logtail = torch.full((lp.shape[0],), -math.inf, device=lp.device)
    return {
        "ids": ids.cpu().numpy().astype(id_dtype(vocab)),
        "logp": top.cpu().numpy().astype(np.float16),
        "logtail": logtail.cpu().numpy().astype(np.float32),
    }


def _encode_topk_is(log_probs: Tensor, k: int, vocab: int, generator: torch.Generator) -> dict[str, np.ndarray]:
    out = _encode_topk(log_probs, k, vocab)
    m = log_probs.shape[0]
    if k >= vocab or m == 0:
        out["tail_ids"] = np.zeros((m, k), id_dtype(vocab))
        out["tail_logp"] = np.full((m, k), -np.inf, np.float16)
        return out
    lp = log_probs.detach().double()
    ids = torch.from_numpy(out["ids"].astype(np.int64)).to(lp.device)
    tail = lp.scatter(-1, ids, -math.inf)  # the teacher's log-probs off the stored ids
    cdf = torch.cumsum((tail - tail.max(dim=-1, keepdim=True).values).exp(), dim=-1)  # float64
    u = torch.rand((m, k), generator=generator, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
    out["tail_ids"] = draws.cpu().numpy().astype(id_dtype(vocab))
    out["tail_logp"] = lp.gather(-1, draws).float().cpu().numpy().astype(np.float16)
    return out


def _encode_sampled(log_probs: Tensor, k: int, vocab: int, generator: torch.Generator) -> dict[str, np.ndarray]:
    m = log_probs.shape[0]
    cd = count_dtype(k)
    if m == 0:
        return {"ids": np.zeros(0, id_dtype(vocab)), "counts": np.zeros(0, cd), "nuniq": np.zeros(0, cd)}
    # Inverse-CDF sampling in float64: the same draws on any device, and no float32 truncation of
    # the tail (the failure that flatters float32 Gumbel sampling).
    # The uniforms come from the (CPU) generator; the CDF stays on the log-probs' device.
    cdf = torch.cumsum(log_probs.detach().double().exp(), dim=-1)
    u = torch.rand((m, k), generator=generator, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1).cpu().numpy()
    d = np.sort(draws, axis=1)
    first = np.ones(d.shape, dtype=bool)  # first occurrence of each distinct id in its row
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    starts = np.flatnonzero(first.ravel())
    ends = np.append(starts[1:], d.size)  # every row begins with a start, so runs never span rows
    return {
        "ids": d.ravel()[starts].astype(id_dtype(vocab)),
        "counts": (ends - starts).astype(cd),
        "nuniq": first.sum(axis=1).astype(cd),
    }


# --------------------------------------------------------------------------------------------------
# Decoding (to torch, ready for the divergences in trainer/method/divergences.py)
# --------------------------------------------------------------------------------------------------
@dataclass
class DenseTargets:
    logp: Tensor  # float32 [M, V]

    @property
    def vocab(self) -> int:
        return self.logp.shape[-1]

    def to_dense(self) -> Tensor:
        return self.logp


@dataclass
class TopKTargets:
    """K stored log-probs and the residual mass, spread uniformly over the V - K other tokens."""

    ids: Tensor  # int64 [M, K]
    logp: Tensor  # float32 [M, K]
    logtail: Tensor  # float32 [M]; -inf when K = V
    vocab: int

    def to_dense(self) -> Tensor:
        m, k = self.ids.shape
        n_tail = self.vocab - k
        fill = (self.logtail - math.log(n_tail)) if n_tail > 0 else torch.full_like(self.logtail, -math.inf)
        out = fill[:, None].expand(m, self.vocab).clone()
        return out.scatter_(-1, self.ids, self.logp)


@dataclass
class SampledTargets:
    """p_hat(v) = count(v) / draws on the sampled ids (padded to the widest row), 0 elsewhere."""

    ids: Tensor  # int64 [M, U_max]; padding rows hold id 0 with weight 0
    weight: Tensor  # float32 [M, U_max] = count / draws
    draws: int
    vocab: int

    def to_dense(self) -> Tensor:
        p = torch.zeros(self.ids.shape[0], self.vocab, dtype=torch.float64)
        p.scatter_add_(-1, self.ids, self.weight.double())
        return torch.log(p).float()


@dataclass
class TopKISTargets(TopKTargets):
    """``TopKTargets`` plus K draws from the teacher's tail law: ids and the teacher's log-probs there."""

    tail_ids: Tensor | None = None  # int64 [M, J]
    tail_logp: Tensor | None = None  # float32 [M, J] (log t_v, not renormalised); -inf when there is no tail


Targets = DenseTargets | TopKTargets | TopKISTargets | SampledTargets


def decode(fields: Mapping[str, np.ndarray], codec: str, vocab: int, k: int,
           device: torch.device | str = "cpu") -> Targets:
    """Turn one sample's codec fields back into torch targets for its M masked positions."""
    _check_codec(codec)
    missing = [f for f in FIELDS[codec] if f not in fields]
    if missing:
        raise CodecError(f"{codec}: missing field(s) {', '.join(missing)}")
    if codec == "dense":
        logp = torch.from_numpy(np.asarray(fields["logp"], dtype=np.float32))
        if logp.dim() != 2 or logp.shape[1] != vocab:
            raise CodecError(f"dense: logp has shape {tuple(logp.shape)}, expected [M, {vocab}]")
        return DenseTargets(logp.to(device))
    if codec in ("topk", "topk_is"):
        ids = torch.from_numpy(np.asarray(fields["ids"]).astype(np.int64))
        logp = torch.from_numpy(np.asarray(fields["logp"]).astype(np.float32))
        logtail = torch.from_numpy(np.asarray(fields["logtail"]).astype(np.float32))
        if ids.dim() != 2 or ids.shape[1] != k or logp.shape != ids.shape or logtail.shape != ids.shape[:1]:
            raise CodecError(f"topk: inconsistent shapes ids {tuple(ids.shape)}, logp {tuple(logp.shape)}, "
                             f"logtail {tuple(logtail.shape)} for K={k}")
        _check_ids(ids, vocab, codec)
        if codec == "topk":
            return TopKTargets(ids.to(device), logp.to(device), logtail.to(device), vocab)
        tids = torch.from_numpy(np.asarray(fields["tail_ids"]).astype(np.int64))
        tlp = torch.from_numpy(np.asarray(fields["tail_logp"]).astype(np.float32))
        if tids.dim() != 2 or tids.shape[0] != ids.shape[0] or tlp.shape != tids.shape:
            raise CodecError(f"topk_is: inconsistent shapes tail_ids {tuple(tids.shape)}, tail_logp "
                             f"{tuple(tlp.shape)} for {ids.shape[0]} positions")
        _check_ids(tids, vocab, codec)
        return TopKISTargets(ids.to(device), logp.to(device), logtail.to(device), vocab, tids.to(device),
                             tlp.to(device))
    ids = np.asarray(fields["ids"]).astype(np.int64)
    counts = np.asarray(fields["counts"]).astype(np.int64)
    nuniq = np.asarray(fields["nuniq"]).astype(np.int64)
    if ids.shape != counts.shape or ids.ndim != 1 or nuniq.ndim != 1 or int(nuniq.sum()) != ids.size:
        raise CodecError(f"sampled: inconsistent fields: ids {ids.shape}, counts {counts.shape}, "
                         f"nuniq sums to {int(nuniq.sum())}")
    m = nuniq.size
    width = int(nuniq.max()) if m else 0
    row = np.repeat(np.arange(m), nuniq)
    col = np.arange(ids.size) - np.repeat(np.cumsum(nuniq) - nuniq, nuniq)
    pid = np.zeros((m, width), dtype=np.int64)
    cnt = np.zeros((m, width), dtype=np.int64)
    pid[row, col], cnt[row, col] = ids, counts
    if m and not np.all(cnt.sum(axis=1) == k):
        raise CodecError(f"sampled: counts do not sum to K={k} at every position")
    tid = torch.from_numpy(pid)
    _check_ids(tid, vocab, codec)
    weight = torch.from_numpy(cnt).float() / k
    return SampledTargets(tid.to(device), weight.to(device), k, vocab)


def _check_ids(ids: Tensor, vocab: int, codec: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CodecError(f"{codec}: token id outside [0, {vocab}) in the stored ids")


def stats(fields: Mapping[str, np.ndarray], codec: str) -> dict[str, float]:
    """Per-sample sums for the manifest and inspect_shards: positions, payload bytes, tail mass
    (topk) or distinct ids (sampled)."""
    out = {"payload_bytes": float(sum(np.asarray(fields[f]).nbytes for f in FIELDS[codec]))}
    if codec in ("topk", "topk_is"):
        out["positions"] = float(fields["logtail"].shape[0])
        out["tail_mass_sum"] = float(np.exp(fields["logtail"].astype(np.float64)).sum())
        out["tail_mass_max"] = float(np.exp(fields["logtail"].astype(np.float64)).max(initial=0.0))
    elif codec == "sampled":
        out["positions"] = float(fields["nuniq"].shape[0])
        out["distinct_sum"] = float(fields["nuniq"].astype(np.int64).sum())
    else:
        out["positions"] = float(fields["logp"].shape[0])
    return out
