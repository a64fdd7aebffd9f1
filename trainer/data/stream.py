"""Pretraining's batch source (the teacher, the control and the AR model): optimizer step k reads the
global batch of data position ``offset + k`` of ``prepared.batches``, this rank's part of it split into
micro-batches. The data position is the step, so the checkpoint records only the step.

    source.batches(step) -> list[LongTensor[micro_batch, L]]   this rank's micro-batches of a step
    source.state(step)   -> {"data_step": step}                saved with the checkpoint after ``step``

The offset is where the stream starts: 0 for the teacher; the control continues the teacher's stream
where the teacher stopped (trainer/distill/control.py, ``control_stream``).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from trainer.data.prepared import batches


class PretrainBatches:
    def __init__(self, tokens: np.ndarray, global_batch: int, rank: int, world_size: int, seed: int,
                 micro_batch: int, offset: int = 0):
        self.tokens, self.global_batch, self.rank, self.world_size = tokens, global_batch, rank, world_size
        self.seed, self.micro_batch, self.offset = seed, micro_batch, offset
        self._it: Iterator[tuple[int, torch.Tensor]] | None = None
        self._next = -1  # the step the open iterator yields next

    def batches(self, step: int) -> list[torch.Tensor]:
        # ``batches`` is a pure function of the step: (re)start it wherever the loop is (a resume).
        if self._it is None or step != self._next:
            self._it = batches(self.tokens, self.global_batch, self.rank, self.world_size, self.seed,
                               start_step=self.offset + step)
        _, local = next(self._it)
        self._next = step + 1
        return list(local.split(self.micro_batch))

    def state(self, step: int) -> dict[str, Any]:
        return {"data_step": step}
