"""What every target codec shares: the storage dtypes, the error, and the two interfaces a codec
implements (``Codec``: the stored fields, their size, encode, decode; ``Targets``: the decoded
torch targets, which know the divergence their code serves)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from trainer.config import PAIRS, Divergence
from trainer.config import Codec as CodecName
from trainer.errors import BadInput

GPT2_VOCAB = 50257


class CodecError(BadInput, ValueError):
    """A code that cannot be encoded or decoded; the message names the codec and the field."""


# --------------------------------------------------------------------------------------------------
# Storage dtypes
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


def check_ids(ids: Tensor, vocab: int, codec: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CodecError(f"{codec}: token id outside [0, {vocab}) in the stored ids")


# --------------------------------------------------------------------------------------------------
# The interfaces
# --------------------------------------------------------------------------------------------------
class Targets(ABC):
    """One sample's (or one batch's) decoded targets for its M masked positions, in position order."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The distribution the code stands for, as log-probs [M, V]."""

    @abstractmethod
    def divergence(self, student_lp: Tensor, kind: str) -> Tensor:
        """Per-position divergence ``kind`` [M] between the student's log-probs [M, V] and these
        targets (the math: trainer/method/divergences.py)."""


class Codec(ABC):
    """How a teacher distribution is stored per masked position: one object per codec, registered
    in trainer/method/codecs/__init__.py under its name in trainer.config.Codec."""

    name: ClassVar[CodecName]
    fields: ClassVar[tuple[str, ...]]  # the arrays it writes (besides a sample's xt.npy and meta.json)
    positions_field: ClassVar[str]  # the field with one entry per masked position
    needs_generator: ClassVar[bool] = False  # it draws: one generator per sample, encoded sample by sample
    uses_k: ClassVar[bool] = True  # dense stores everything: no K
    size_note: ClassVar[str] = ""  # tools/inspect_shards.py --sizes
    position_label: ClassVar[str] = ""  # what ``position_values`` measures ("" = nothing)

    @property
    def divergences(self) -> tuple[Divergence, ...]:
        """The divergences its targets serve (trainer.config.PAIRS)."""
        return PAIRS[self.name]

    def k_max(self, vocab: int) -> int:
        """The largest K the code accepts at this vocabulary."""
        return vocab

    @abstractmethod
    def bytes_per_position(self, k: int, vocab: int, distinct: float | None = None) -> float:
        """Payload bytes stored per masked position (see ``codecs.bytes_per_position``)."""

    @abstractmethod
    def encode(self, log_probs: Tensor, k: int, vocab: int, generator: torch.Generator | None
               ) -> dict[str, np.ndarray]:
        """The fields of log-probs [M, V] (checked 2-D); ``generator`` only if ``needs_generator``."""

    @abstractmethod
    def decode(self, fields: Mapping[str, np.ndarray], vocab: int, k: int, device: torch.device | str
               ) -> Targets:
        """Torch targets from one sample's fields (every name in ``fields`` present)."""

    def position_sums(self, fields: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Per-sample sums beside payload_bytes and positions, for the manifest and inspect_shards."""
        return {}

    def position_values(self, fields: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """float64 [M]: the per-position quantity ``position_label`` names (None = nothing to show)."""
        return None

    def size_row_note(self, k: int, vocab: int, distinct: float | None) -> str:
        """The note of its row in the size table; ``distinct``: measured distinct ids per position, if any."""
        return self.size_note

    def check_k(self, k: int, vocab: int) -> None:
        if not 1 <= k <= self.k_max(vocab):
            raise CodecError(f"{self.name}: k={k} must be in [1, {vocab}]")

    def require_generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is None:
            raise CodecError(f"{self.name}: a torch.Generator is required (the draws must be reproducible)")
        return generator
