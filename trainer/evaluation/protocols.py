"""Which of a judge's tokens gen-PPL scores, per published protocol (pure functions on id tensors).

The three protocols (``eval.gen_ppl``), each stated from its reference code:

* ``mdlm`` (MDLM ``diffusion.py:566-573``, Duo ``metrics.py:205-210``): the whole retokenised sample
  (truncated to the judge's context), positions 1..T-1 only (position 0 has no context), and of
  those: every non-EOS token plus the *first* EOS, i.e. ``(cumsum(x == EOS) == 1) | (x != EOS)``.
  A wrapped sample starts with its BOS (= GPT-2's EOS), which is then the first EOS and sits at the
  unscored position 0: only non-EOS tokens count. Averaged per token over all samples
  (torchmetrics ``MeanMetric`` with the mask as weights): exp(sum NLL / sum scored).
* ``sdtt`` (SDTT ``run_eval.py:227-258``): every position 1..T-1 of the sample, EOS included, no
  retokenisation (the judge shares the model's GPT-2 vocabulary); each sample's mean NLL, then the
  mean over samples, then exp.
* ``first_doc`` (this project's earlier rule): the retokenised sample cut after its first EOS
  (one leading EOS kept as unscored context, nothing after the first EOS scored); a judge with its
  own BOS also scores position 0. Token-weighted like ``mdlm``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from trainer.config import GenPPL, choice_names

GEN_PPL_PROTOCOLS = choice_names(GenPPL)


def scored_mask(x: torch.Tensor, lengths: torch.Tensor, eos_id: int, protocol: str) -> torch.Tensor:
    """Bool [B, T]: the positions of the judge's ids ``x`` (Long [B, T], padded after ``lengths``)
    whose NLL counts. ``first_doc`` expects sequences already cut by ``text.cut_at_eos``; its
    position 0 counts unless it is that leading EOS (the judge says separately whether it can score
    position 0 at all: NaN log-probs are never counted)."""
    pos = torch.arange(x.shape[1])[None, :]
    inside = pos < lengths[:, None]
    if protocol == "first_doc":
        mask = inside.clone()
        mask[:, 0] &= x[:, 0] != eos_id
        return mask
    mask = inside & (pos >= 1)
    if protocol == "sdtt":
        return mask
    if protocol == "mdlm":
        is_eos = x == eos_id
        first_eos = is_eos.long().cumsum(dim=1) == 1
        return mask & (first_eos | ~is_eos)
    raise ValueError(f"unknown gen-PPL protocol {protocol!r} (one of {', '.join(GEN_PPL_PROTOCOLS)})")


def masked_entropies(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Per row, the entropy (nats) of the histogram of the ids where ``mask`` is true, float64 [B]
    (NaN for a row with none): the entropy of exactly the tokens gen-PPL scored."""
    out = np.full(x.shape[0], math.nan)
    for i in range(x.shape[0]):
        ids = x[i][mask[i]]
        if ids.numel():
            p = torch.unique(ids, return_counts=True)[1].double() / ids.numel()
            out[i] = float(-(p * p.log()).sum())
    return out


def gen_nll(nll_sums: np.ndarray, counts: np.ndarray, protocol: str) -> float:
    """The protocol's average NLL per token: SDTT's mean of per-sample means, else the ratio of sums
    (the two agree when every sample scores the same number of tokens, as SDTT's always do)."""
    counts = np.asarray(counts)
    if counts.sum() == 0:
        return math.nan
    if protocol == "sdtt":
        keep = counts > 0
        return float(np.mean(np.asarray(nll_sums)[keep] / counts[keep]))
    return float(np.sum(nll_sums) / counts.sum())
