"""``sampled``: Random-Sampling KD (Anshumann et al. 2025): K draws with replacement from the teacher
distribution (float64 inverse-CDF), stored ragged as the distinct ids with their counts: ``ids`` [U]
(grouped by position, increasing id), ``counts`` [U], ``nuniq`` [M] (distinct ids per position,
sum = U). The decoded estimate is p_hat(v) = count(v) / K: E[p_hat] = p exactly (unbiased), with
variance p (1 - p) / K. A peaked distribution needs few distinct ids, which is where the saving comes
from; the worst case is U = K per position. Serves forward KL only (trainer/method/divergences.py
``sampled_fkl``)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from trainer.config import Codec as CodecName
from trainer.method import divergences
from trainer.method.codecs.base import Codec, CodecError, Targets, check_ids, count_dtype, id_dtype


@dataclass
class SampledTargets(Targets):
    """p_hat(v) = count(v) / draws on the sampled ids (padded to the widest row), 0 elsewhere."""

    codec: ClassVar[str] = CodecName.sampled.value
    ids: Tensor  # int64 [M, U_max]; padding rows hold id 0 with weight 0
    weight: Tensor  # float32 [M, U_max] = count / draws
    draws: int
    vocab: int

    def to_dense(self) -> Tensor:
        p = torch.zeros(self.ids.shape[0], self.vocab, dtype=torch.float64)
        p.scatter_add_(-1, self.ids, self.weight.double())
        return torch.log(p).float()

    def divergence(self, student_lp: Tensor, kind: str) -> Tensor:
        return divergences.sampled_fkl(student_lp, self)  # the only pairing (checked by sparse_divergence)


class Sampled(Codec):
    name = CodecName.sampled
    fields = ("ids", "counts", "nuniq")
    positions_field = "nuniq"
    needs_generator = True
    position_label = "distinct ids"

    def k_max(self, vocab: int) -> int:
        return 1 << 30  # draws with replacement: K may exceed V

    def bytes_per_position(self, k: int, vocab: int, distinct: float | None = None) -> float:
        ib, cb = id_dtype(vocab).itemsize, count_dtype(k).itemsize
        u = float(k) if distinct is None else float(distinct)
        return u * (ib + cb) + cb  # distinct ids + their counts, + the per-position distinct count

    def encode(self, log_probs: Tensor, k: int, vocab: int, generator: torch.Generator | None
               ) -> dict[str, np.ndarray]:
        self.check_k(k, vocab)
        generator = self.require_generator(generator)
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

    def decode(self, fields: Mapping[str, np.ndarray], vocab: int, k: int, device: torch.device | str
               ) -> SampledTargets:
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
        check_ids(tid, vocab, self.name)
        weight = torch.from_numpy(cnt).float() / k
        return SampledTargets(tid.to(device), weight.to(device), k, vocab)

    def position_values(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        return fields["nuniq"].astype(np.float64)

    def position_sums(self, fields: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"distinct_sum": float(fields["nuniq"].astype(np.int64).sum())}

    def size_row_note(self, k: int, vocab: int, distinct: float | None) -> str:
        note = "worst case (K distinct ids)"
        if distinct is not None:
            note += (f"; measured {self.bytes_per_position(k, vocab, distinct):,.1f} "
                     f"({distinct:.2f} distinct ids)")
        return note


CODEC = Sampled()
