"""MAUVE in SDTT's protocol (``eval.mauve_protocol=sdtt``): the prompts and the seeds.

SDTT (``configs/config.yaml:119-124``, ``configs/parameterization/multi-round-sdtt.yaml:38-55``,
``core/distill/multi_round_sdtt.py:566-695``, ``run_eval.py:29-110``, ``data/dataloader.py:44-112``):

* prompts: GPT-2's ``webtext.test.jsonl`` documents, tokenised without BOS/EOS, those of at least
  ``min_seq_len`` = 1024 tokens kept, the first ``num_samples`` = 1024 of them, each truncated to
  ``seq_len`` = 100 tokens; the first ``prefix_len`` = 50 are clamped while sampling;
* ``num_cont_per_prefix`` = 5 continuations per prompt, sampled once (``seed_everything(200)``);
* MAUVE on the first ``max_num_tokens`` = 100 tokens of each sequence, the prompt *included*:
  p = the 1024 documents' first 100 tokens, q = the 5120 samples; features of ``gpt2-large``
  (``AutoModel``: the last position's final hidden state, ``mauve.utils.featurize_tokens_from_model``);
* ``compute_mauve`` with seeds 1..5 (``num_rounds``: only MAUVE's own quantisation changes),
  ``mauve_scaling_factor`` = 5, ``num_buckets='auto'``; reported as the mean and ``np.std`` (ddof 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.data.corpus import jsonl_texts
from trainer.data.tokenizers import Tokenizer
from trainer.evaluation.quality import JudgeError


def load_prompts(path: str | Path, tokenizer: Tokenizer, n: int, min_tokens: int, keep: int) -> torch.Tensor:
    """Long [n, keep]: the first ``n`` documents of the jsonl at ``path`` (a ``text`` field per line)
    whose tokens (no BOS/EOS) number at least ``min_tokens``, each cut to its first ``keep`` tokens."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"eval.mauve_prompts: {path} is not a file (a jsonl with a 'text' field per line)")
    rows, seen = [], 0
    for text in jsonl_texts(path, "text", key="eval.mauve_prompts"):
        seen += 1
        ids = tokenizer.encode(text)
        if len(ids) >= min_tokens:
            rows.append(ids[:keep])
            if len(rows) == n:
                return torch.tensor(rows, dtype=torch.long)
    raise JudgeError(f"eval.mauve_prompts: {path} has {len(rows)} documents of at least {min_tokens} tokens "
                     f"(of {seen}); eval.mauve_samples={n} asks for {n}: lower it or eval.mauve_min_doc_tokens")


def mauve_over_seeds(p_features: np.ndarray, q_features: np.ndarray, seeds: int, scaling: float) -> dict:
    """SDTT's MAUVE: ``compute_mauve`` at seeds 1..``seeds`` on fixed features, 'auto' buckets;
    the mean, the population std (``np.std``) and every seed's value."""
    try:
        import mauve
    except ImportError:
        raise JudgeError("MAUVE needs the 'mauve-text' package: pip install -e '.[hf]'") from None
    values = [float(mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=1 + i,
                                        verbose=False, mauve_scaling_factor=scaling).mauve)
              for i in range(seeds)]
    return {"mauve": float(np.mean(values)), "mauve_std": float(np.std(values)), "mauve_per_seed": values}
