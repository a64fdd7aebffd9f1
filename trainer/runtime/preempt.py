"""Stop cleanly on preemption or a time limit.

SLURM sends USR2 (``--signal=USR2@<lead>``) to every task some seconds before the limit or a
preemption; a plain ``scancel`` or kill sends TERM. The handler only sets a flag: the training loop
checks it at a step boundary, all ranks agree (any rank signalled means all stop), everyone saves a
checkpoint with the data position, and the job exits with ``trainer.layout.EXIT_PREEMPTED`` so the
launcher knows to requeue rather than call it a failure.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as tdist


class StopFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank was signalled (a collective: call on all ranks)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if tdist.is_available() and tdist.is_initialized():
            if tdist.get_backend() == "nccl":
                flag = flag.cuda()
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item() > 0)
