"""``dense``: ``logp`` fp32 [M, V]. Exact. For tests and small vocabularies; serves every divergence."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from trainer.config import Codec as CodecName
from trainer.method import divergences
from trainer.method.codecs.base import Codec, CodecError, Targets


@dataclass
class DenseTargets(Targets):
    codec: ClassVar[str] = CodecName.dense.value
    logp: Tensor  # float32 [M, V]

    @property
    def vocab(self) -> int:
        return self.logp.shape[-1]

    def to_dense(self) -> Tensor:
        return self.logp

    def divergence(self, student_lp: Tensor, kind: str) -> Tensor:
        return divergences.dense_divergence(student_lp, self.logp.to(student_lp.device), kind)


class Dense(Codec):
    name = CodecName.dense
    fields = ("logp",)
    positions_field = "logp"
    uses_k = False
    size_note = "fp32, exact"

    def bytes_per_position(self, k: int, vocab: int, distinct: float | None = None) -> float:
        return 4.0 * vocab

    def encode(self, log_probs: Tensor, k: int, vocab: int, generator: torch.Generator | None
               ) -> dict[str, np.ndarray]:
        return {"logp": log_probs.float().cpu().numpy().astype(np.float32, copy=False)}

    def decode(self, fields: Mapping[str, np.ndarray], vocab: int, k: int, device: torch.device | str
               ) -> DenseTargets:
        logp = torch.from_numpy(np.asarray(fields["logp"], dtype=np.float32))
        if logp.dim() != 2 or logp.shape[1] != vocab:
            raise CodecError(f"dense: logp has shape {tuple(logp.shape)}, expected [M, {vocab}]")
        return DenseTargets(logp.to(device))


CODEC = Dense()
