"""A few samples of the current weights during training, with their exact quality when the data is synthetic."""
from __future__ import annotations

from typing import Any

import torch

from trainer.config import RunConfig
from trainer.data.synthetic import MarkovSource
from trainer.data.tokenizers import render_samples
from trainer.evaluation.quality import markov_quality
from trainer.method import sampling


def sample_report(model: Any, cfg: RunConfig, source: MarkovSource | None, device: torch.device,
                  n: int = 16) -> tuple[dict[str, float], str]:
    """``n`` samples at ``sampling.steps`` from ``model`` (an engine or a module: callable, with
    eval/train), returned to train mode. Every rank samples the same sequences with the same seed
    (under ZeRO-3 each forward is a collective, so all ranks must make the same calls). Returns the
    scalars (``sample/nll@S``, ``sample/entropy@S`` with a synthetic source) and 4 samples as text."""
    model.eval()
    mask_id = cfg.model.vocab_size
    denoise = sampling.make_denoiser(model, mask_id, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    x = sampling.sample_diffusion(denoise, n, cfg.data.seq_len, cfg.sampling.steps, mask_id,
                                  noise_eps=cfg.diffusion.noise_eps, sampling_eps=cfg.diffusion.sampling_eps,
                                  generator=torch.Generator().manual_seed(cfg.sampling.seed), device=device,
                                  cache=cfg.sampling.cache and not cfg.model.time_conditioning,
                                  **sampling.sampler_options(cfg.sampling)).cpu()
    model.train()
    scalars = {}
    if source is not None:
        q = markov_quality(source, x)
        scalars = {f"sample/nll@{cfg.sampling.steps}": q["nll"], f"sample/entropy@{cfg.sampling.steps}": q["entropy"]}
    text = "\n\n".join(render_samples(cfg.data, x[:4]))  # decoded for text sources
    return scalars, text
