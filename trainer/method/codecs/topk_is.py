"""``topk_is``: ``topk``'s three fields plus K importance-sampled tail ids: ``tail_ids`` [M, K] drawn
with replacement from the teacher's tail law (its distribution renormalised over the V - K
non-stored ids; float64 inverse CDF, from the sample's generator) and ``tail_logp`` fp16 [M, K], the
teacher's log-probs there. Where ``topk`` only knows the tail's total mass, these give an unbiased
estimate of how the student's tail shape differs from the teacher's (trainer/method/divergences.py
``tail_shape_term``), so a student cannot collapse its tail for free. Twice ``topk``'s bytes at the
same K. With K = V (no tail) the tail fields hold id 0 and -inf."""
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
from trainer.method.codecs.base import CodecError, check_ids, id_dtype
from trainer.method.codecs.topk import TopK, TopKTargets, decode_topk, encode_topk


@dataclass
class TopKISTargets(TopKTargets):
    """``TopKTargets`` plus K draws from the teacher's tail law: ids and the teacher's log-probs there."""

    codec: ClassVar[str] = CodecName.topk_is.value
    tail_ids: Tensor | None = None  # int64 [M, J]
    tail_logp: Tensor | None = None  # float32 [M, J] (log t_v, not renormalised); -inf when there is no tail

    def divergence(self, student_lp: Tensor, kind: str) -> Tensor:
        coarse = divergences.topk_divergence(student_lp, self, kind)
        return coarse + divergences.tail_shape_term(student_lp, self, kind)


class TopKIS(TopK):
    name = CodecName.topk_is
    fields = ("ids", "logp", "logtail", "tail_ids", "tail_logp")
    needs_generator = True
    size_note = "topk + K importance-sampled tail ids with their fp16 log-probs"

    def bytes_per_position(self, k: int, vocab: int, distinct: float | None = None) -> float:
        # top-K and K tail draws (ids + fp16 log-probs), + log tail mass
        return 2 * k * (id_dtype(vocab).itemsize + 2) + 4.0

    def encode(self, log_probs: Tensor, k: int, vocab: int, generator: torch.Generator | None
               ) -> dict[str, np.ndarray]:
        self.check_k(k, vocab)
        generator = self.require_generator(generator)
        out = encode_topk(log_probs, k, vocab)
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

    def decode(self, fields: Mapping[str, np.ndarray], vocab: int, k: int, device: torch.device | str
               ) -> TopKISTargets:
        ids, logp, logtail = decode_topk(fields, vocab, k, self.name)
        tids = torch.from_numpy(np.asarray(fields["tail_ids"]).astype(np.int64))
        tlp = torch.from_numpy(np.asarray(fields["tail_logp"]).astype(np.float32))
        if tids.dim() != 2 or tids.shape[0] != ids.shape[0] or tlp.shape != tids.shape:
            raise CodecError(f"topk_is: inconsistent shapes tail_ids {tuple(tids.shape)}, tail_logp "
                             f"{tuple(tlp.shape)} for {ids.shape[0]} positions")
        check_ids(tids, vocab, self.name)
        return TopKISTargets(ids.to(device), logp.to(device), logtail.to(device), vocab, tids.to(device),
                             tlp.to(device))


CODEC = TopKIS()
