"""``topk``: ``ids`` [M, K] (the K most likely tokens, by decreasing probability, ties by increasing
id), ``logp`` fp16 [M, K] (their log-probs) and ``logtail`` fp32 [M]: the log of the residual mass
1 - sum(top-K) outside the stored ids, computed in float64 as a log-sum-exp over the non-stored
log-probs (not as 1 - sum, which cancels), so it stays accurate when the tail is tiny; -inf when
K = V. Decoding spreads the tail mass uniformly over the V - K non-stored tokens; the divergences
compare the student coarse-grained onto the K ids plus one tail bucket
(trainer/method/divergences.py ``topk_divergence``)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from trainer.config import Codec as CodecName
from trainer.method import divergences
from trainer.method.codecs.base import Codec, CodecError, Targets, check_ids, id_dtype


@dataclass
class TopKTargets(Targets):
    """K stored log-probs and the residual mass, spread uniformly over the V - K other tokens."""

    codec: ClassVar[str] = CodecName.topk.value
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

    def divergence(self, student_lp: Tensor, kind: str) -> Tensor:
        return divergences.topk_divergence(student_lp, self, kind)


def encode_topk(log_probs: Tensor, k: int, vocab: int) -> dict[str, np.ndarray]:
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


def decode_topk(fields: Mapping[str, np.ndarray], vocab: int, k: int, codec: str) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, logp, logtail) on the CPU, their shapes and ids checked."""
    ids = torch.from_numpy(np.asarray(fields["ids"]).astype(np.int64))
    logp = torch.from_numpy(np.asarray(fields["logp"]).astype(np.float32))
    logtail = torch.from_numpy(np.asarray(fields["logtail"]).astype(np.float32))
    if ids.dim() != 2 or ids.shape[1] != k or logp.shape != ids.shape or logtail.shape != ids.shape[:1]:
        raise CodecError(f"topk: inconsistent shapes ids {tuple(ids.shape)}, logp {tuple(logp.shape)}, "
                         f"logtail {tuple(logtail.shape)} for K={k}")
    check_ids(ids, vocab, codec)
    return ids, logp, logtail


class TopK(Codec):
    name = CodecName.topk
    fields = ("ids", "logp", "logtail")
    positions_field = "logtail"
    size_note = "fp16 log-probs + ids + log tail mass"
    position_label = "tail mass"

    def bytes_per_position(self, k: int, vocab: int, distinct: float | None = None) -> float:
        return k * (id_dtype(vocab).itemsize + 2) + 4.0  # ids + fp16 log-probs, + fp32 log tail mass

    def encode(self, log_probs: Tensor, k: int, vocab: int, generator: torch.Generator | None
               ) -> dict[str, np.ndarray]:
        self.check_k(k, vocab)
        return encode_topk(log_probs, k, vocab)

    def decode(self, fields: Mapping[str, np.ndarray], vocab: int, k: int, device: torch.device | str
               ) -> TopKTargets:
        ids, logp, logtail = decode_topk(fields, vocab, k, self.name)
        return TopKTargets(ids.to(device), logp.to(device), logtail.to(device), vocab)

    def position_values(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.exp(fields["logtail"].astype(np.float64))

    def position_sums(self, fields: Mapping[str, np.ndarray]) -> dict[str, float]:
        mass = self.position_values(fields)
        return {"tail_mass_sum": float(mass.sum()), "tail_mass_max": float(mass.max(initial=0.0))}


CODEC = TopK()
