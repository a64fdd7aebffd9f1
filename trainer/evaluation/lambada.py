"""LAMBADA zero-shot, as SDTT computes it for a masked diffusion model (``eval.lambada``).

SDTT (``core/distill/multi_round_sdtt.py:698-846``, ``data/dataloader.py:296-334``):

* Each example's text is split at its last space: the prefix is the text before it, the target
  word the rest *with* its leading space. Prefix ids = [BOS] + tokens (``add_bos: True``), target
  ids = tokens + [EOS] (``add_eos: True``); GPT-2's BOS and EOS are both ``<|endoftext|>``.
* **Accuracy**: one forward pass on prefix + [MASK] x (target tokens) + [EOS], at t = sampling_eps;
  every masked position takes its argmax (MASK excluded), all at once; the example counts as
  correct when every target token is right. Reported: the mean over examples.
* **Perplexity**: per example, the MDLM bound on the target word: 32 noise levels t (stratified),
  each target token masked with probability (1 - eps) t, prefix and final EOS kept visible,
  sum over masked tokens of -log p(token) x dsigma/expm1(sigma), averaged over the 32 t. The
  reported "ppl" is exp(mean over examples of that per-example sum): a perplexity per *word*,
  not per token.

The file is a local jsonl with a ``text`` field (openai's ``lambada_test.jsonl``, what SDTT
downloads; ``EleutherAI/lambada_openai``'s test split has the same field).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.data.corpus import jsonl_texts
from trainer.data.tokenizers import Tokenizer
from trainer.evaluation.quality import JudgeError
from trainer.method import diffusion


def split_last_word(text: str) -> tuple[str, str]:
    """SDTT's ``hide_last_word``: (text before the last space, the rest from that space on). With
    no space, ``rfind`` gives -1, so their split is (all but the last character, the last one)."""
    i = text.rfind(" ")
    return text[:i], text[i:]


def load_examples(path: str | Path, tokenizer: Tokenizer, bos_id: int | None = None,
                  limit: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prefix ids, target ids) per line of the jsonl at ``path``: [BOS] + prefix, target + [EOS]
    (BOS = ``bos_id``, default the tokenizer's EOS, as GPT-2 has one token for both)."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"eval.lambada: {path} is not a file (a jsonl with a 'text' field per line)")
    bos = tokenizer.eos_id if bos_id is None else bos_id
    out = []
    for text in jsonl_texts(path, "text", key="eval.lambada"):
        prefix, target = split_last_word(text)
        out.append(([bos, *tokenizer.encode(prefix)], [*tokenizer.encode(target), tokenizer.eos_id]))
        if limit and len(out) >= limit:
            break
    if not out:
        raise JudgeError(f"eval.lambada: {path} holds no examples")
    return out


def _sigma(t: torch.Tensor, eps: float, time_conditioning: bool, device: torch.device) -> torch.Tensor | None:
    return diffusion.sigma_of_t(t, eps).to(device) if time_conditioning else None


@torch.no_grad()
def greedy_correct(model: nn.Module, prefix: list[int], target: list[int], mask_id: int, eps: float,
                   t_min: float, time_conditioning: bool, device: torch.device) -> bool:
    """Every target token (its EOS aside) masked at once, each position's argmax, one forward."""
    n = len(target) - 1
    x = torch.tensor([[*prefix, *([mask_id] * n), target[-1]]], device=device)
    sigma = _sigma(torch.tensor([t_min]), eps, time_conditioning, device)
    log_p = diffusion.masked_log_probs(model(x, sigma, rows=x == mask_id), mask_id)  # [n, V]
    return bool(torch.equal(log_p.argmax(-1).cpu(), torch.tensor(target[:-1])))


@torch.no_grad()
def target_bound(model: nn.Module, prefix: list[int], target: list[int], mask_id: int, eps: float,
                 t_min: float, time_conditioning: bool, device: torch.device, t_samples: int,
                 generator: torch.Generator) -> float:
    """The MDLM bound (nats) on the whole target word given the prefix, averaged over ``t_samples``
    stratified noise levels: SDTT's ``eval_suffix_nll``."""
    x0 = torch.tensor([*prefix, *target]).repeat(t_samples, 1)
    t = diffusion.sample_times(t_samples, generator, t_min, antithetic=True)
    xt = diffusion.mask_tokens(x0, t, mask_id, eps, generator)
    xt[:, :len(prefix)] = x0[:, :len(prefix)]
    xt[:, -1] = x0[:, -1]
    masked = xt == mask_id
    if not bool(masked.any()):
        return 0.0
    x0, xt = x0.to(device), xt.to(device)
    log_p = diffusion.masked_log_probs(model(xt, _sigma(t, eps, time_conditioning, device), rows=xt == mask_id),
                                       mask_id)
    # elbo_nll_at divides each row's weighted sum by the row length: undo it for SDTT's sum.
    per_t = diffusion.elbo_nll_at(log_p, x0, xt, t.to(device), mask_id, eps).double() * x0.shape[-1]
    return float(per_t.mean())


def evaluate(model: nn.Module, examples: list[tuple[list[int], list[int]]], mask_id: int, eps: float,
             t_min: float, time_conditioning: bool, device: torch.device, t_samples: int = 32,
             seed: int = 0) -> dict:
    """SDTT's LAMBADA numbers: accuracy (greedy, all target tokens at once) and exp(mean per-example
    bound), with the per-example values for paired comparisons across models."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct, bounds = [], []
    for prefix, target in examples:
        correct.append(greedy_correct(model, prefix, target, mask_id, eps, t_min, time_conditioning, device))
        bounds.append(target_bound(model, prefix, target, mask_id, eps, t_min, time_conditioning, device,
                                   t_samples, gen))
    acc = np.asarray(correct, dtype=np.float64)
    b = np.asarray(bounds)
    return {"lambada_acc": float(acc.mean()),
            "lambada_acc_se": float(acc.std(ddof=1) / math.sqrt(acc.size)) if acc.size > 1 else None,
            "lambada_ppl": math.exp(float(b.mean())), "lambada_nll": float(b.mean()),
            "lambada_examples": int(acc.size),
            "lambada_correct_per_example": [int(c) for c in correct],
            "lambada_nll_per_example": [round(float(v), 6) for v in b]}
