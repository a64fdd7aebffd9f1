"""What the AR stage (``trainer.jobs.pretrain --ar``) reports at each evaluation: its exact validation
NLL and a few samples (KV-cached; through the engine under ZeRO-3, whose forwards are collectives)."""
from __future__ import annotations

import torch

from trainer.config import RunConfig
from trainer.data.synthetic import MarkovSource
from trainer.data.tokenizers import render_samples
from trainer.evaluation.quality import markov_quality
from trainer.evaluation.validation import valid_mean
from trainer.method import sampling
from trainer.method.autoregressive import ar_loss


def autoregressive_report(engine, valid: torch.Tensor, cfg: RunConfig, source: MarkovSource | None, metrics,
                          step: int, rank: int, world: int) -> dict[str, float]:
    """``val/nll`` (nats/token, exact: a collective mean over ranks of ``train.eval_batches`` batches)
    and, with a synthetic source, the samples' exact NLL; 4 samples go to TensorBoard as text."""
    scalars = {"val/nll": valid_mean(engine, valid, cfg, rank, world,
                                     lambda b, x0: ar_loss(engine, x0, cfg.model.vocab_size))}
    engine.eval()
    with torch.no_grad():
        zero3 = cfg.engine.zero_stage == 3
        x = sampling.sample_ar(engine if zero3 else engine.module, 4, cfg.data.seq_len, cfg.model.vocab_size,
                               generator=torch.Generator().manual_seed(cfg.sampling.seed), device=engine.device,
                               use_cache=not zero3)
    engine.train()
    if source is not None:
        scalars["sample/nll"] = markov_quality(source, x.cpu())["nll"]
    metrics.text(step, "samples", "\n\n".join(render_samples(cfg.data, x.cpu())))
    return scalars
