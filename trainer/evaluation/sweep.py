"""Sample a model at several step counts and measure what came out.

One row per (model, steps): exact NLL under the synthetic source with its standard error and the gap
to the source's entropy, the bigram KL that exposes lost diversity, generative perplexity under a
judge when one is configured, and always the sample entropy beside them.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from trainer.config import RunConfig
from trainer.data.prepared import MarkovSource
from trainer.evaluation.quality import JudgeFn, gen_ppl, markov_quality, unigram_entropy
from trainer.method import sampling


def draw_samples(model: nn.Module, cfg: RunConfig, steps: int, num_samples: int, seed: int,
                 device: torch.device, progress: bool = False) -> tuple[torch.Tensor, int]:
    """``num_samples`` sequences at ``steps`` steps, in batches; (samples on CPU, denoiser calls)."""
    mask_id = cfg.model.vocab_size
    denoise = sampling.make_denoiser(model, mask_id, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    # One generator for the whole draw: the samples depend on the seed, not on the batch size.
    gen = torch.Generator().manual_seed(seed)
    out, nfe = [], 0
    for start in range(0, num_samples, cfg.eval.batch_size):
        n = min(cfg.eval.batch_size, num_samples - start)
        stats: dict = {}
        x = sampling.sample_diffusion(denoise, n, cfg.data.seq_len, steps, mask_id,
                                      noise_eps=cfg.diffusion.noise_eps, sampling_eps=cfg.diffusion.sampling_eps,
                                      generator=gen, device=device,
                                      cache=cfg.sampling.cache and not cfg.model.time_conditioning,
                                      progress=progress, stats=stats)
        out.append(x.cpu())
        nfe += stats["nfe"]
    return torch.cat(out), nfe


def quality_row(samples: torch.Tensor, source: MarkovSource | None, judge: JudgeFn | None) -> dict:
    """Every quality number for one set of samples; absent measures are None, never omitted."""
    row: dict = {"nll": None, "nll_se": None, "nll_gap": None, "bigram_kl": None, "gen_ppl": None}
    if source is not None:
        row.update(markov_quality(source, samples))
    else:
        row["entropy"] = unigram_entropy(samples)
    if judge is not None:
        row["gen_ppl"] = gen_ppl(judge, samples)
    row["samples"] = int(samples.shape[0])
    return row


def evaluate_model(model: nn.Module, cfg: RunConfig, steps_list: list[int], source: MarkovSource | None,
                   judge: JudgeFn | None, device: torch.device, progress: bool = False,
                   keep_samples: bool = False) -> list[dict]:
    """One quality row per step count, each with its timing and number of denoiser calls.

    Every step count uses the same seed (cfg.eval.seed), so rows differ by the sampler alone.
    """
    model.eval()
    rows = []
    for steps in sorted(set(steps_list)):
        t0 = time.perf_counter()
        samples, nfe = draw_samples(model, cfg, steps, cfg.eval.num_samples, cfg.eval.seed, device, progress)
        row = {"steps": steps, **quality_row(samples, source, judge), "nfe": nfe,
               "seconds": round(time.perf_counter() - t0, 3)}
        if keep_samples:
            row["_samples"] = samples
        rows.append(row)
    return rows


def format_table(rows: list[dict], columns: tuple[str, ...] = ("model", "round", "steps", "nll", "nll_se",
                                                               "entropy", "bigram_kl", "gen_ppl")) -> str:
    """A fixed-width text table of result rows (missing values shown as '-')."""
    cols = [c for c in columns if any(c in r for r in rows)]

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if np.isfinite(v) else str(v)
        return str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
