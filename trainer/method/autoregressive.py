"""The autoregressive baseline's objective: next-token cross-entropy for ``DiT(cfg, causal=True)``.

The causal DiT reads BOS (= the MASK id, V) followed by the first L - 1 tokens of a row, and the
logits at position i score token i, so all L tokens of a row are predicted (the same convention as
the AR judge, trainer/evaluation/judges.py ``ARJudge``, and ``sampling.sample_ar``). The MASK
column is dropped: the model's law is over the V real tokens. Its mean NLL per token is an exact
likelihood (not a bound), directly comparable with the MDLM teacher's ELBO on the same rows.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def shift_right(x0: Tensor, bos_id: int) -> Tensor:
    """[BOS, x_0, ..., x_{L-2}]: the causal model's input for the row x0."""
    return torch.cat([torch.full_like(x0[:, :1], bos_id), x0[:, :-1]], dim=1)


def nll_per_token(logits: Tensor, x0: Tensor, vocab_size: int) -> Tensor:
    """Per-row mean NLL (nats/token), float32 [B], of rows x0 [B, L] from logits [B, L, V (+1)]."""
    logits = logits[..., :vocab_size].float()
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none")
    return ce.view(x0.shape).mean(-1)


def ar_loss(forward: Callable[[Tensor], Tensor], x0: Tensor, vocab_size: int) -> Tensor:
    """Mean next-token NLL of one micro-batch (on the forward's device) through ``forward`` (a causal
    DiT, or the engine wrapping one)."""
    return nll_per_token(forward(shift_right(x0, vocab_size)), x0, vocab_size).mean()
