"""Quality of generated samples: exact likelihood under the synthetic source, sample entropy, bigram
coverage, and generative perplexity under an autoregressive judge.

Everything but the judges is a pure function of the samples (int [n, L], numpy or torch). Sample
entropy goes next to every likelihood-style number: a sampler that collapses onto likely tokens
looks better on NLL and gen-PPL while losing diversity, and only the entropy (and the bigram KL
below) shows it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.data.synthetic import DENSE_MAX_VOCAB, MarkovSource
from trainer.errors import BadInput

# A judge maps token ids Long[B, L] to the log-probabilities of the tokens it scores, Float[B, T]
# (T = L - 1 without a BOS, L with one), batched inside, without gradients.
JudgeFn = Callable[[torch.Tensor], torch.Tensor]


class JudgeError(BadInput, ValueError):
    """A judge model could not be loaded or cannot score the given ids; names the path or the id."""


def _as_numpy(samples: np.ndarray | torch.Tensor) -> np.ndarray:
    x = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"samples must be an integer array [n, L], got {x.dtype} {x.shape}")
    return x.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------------
# Against the synthetic source (exact)
# --------------------------------------------------------------------------------------------------
class MeanSE(NamedTuple):
    mean: float
    se: float  # standard error of the mean over sequences (nan for a single sequence)


def exact_nll(source: MarkovSource, samples: np.ndarray | torch.Tensor) -> MeanSE:
    """Per-token NLL (nats) of the samples under the true source: mean and standard error over
    sequences. A perfect sampler reaches ``source.sequence_entropy_per_token(L)`` on average."""
    nll = source.nll_per_token(_as_numpy(samples))
    se = float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else math.nan
    return MeanSE(float(nll.mean()), se)


def bigram_counts(samples: np.ndarray | torch.Tensor, vocab_size: int) -> np.ndarray:
    """Counts of consecutive pairs (x_t, x_t+1) over all sequences, float64 [V, V]."""
    x = _as_numpy(samples)
    pairs = (x[:, :-1] * vocab_size + x[:, 1:]).ravel()
    return np.bincount(pairs, minlength=vocab_size * vocab_size).astype(np.float64).reshape(
        vocab_size, vocab_size)


def bigram_kl(source: MarkovSource, samples: np.ndarray | torch.Tensor, smoothing: float = 0.01) -> float:
    """KL(p || q): p the source's stationary bigram law, q the samples' bigram frequencies with
    ``smoothing`` pseudo-counts on every pair (nats).

    Why this direction: KL(p || q) charges log(p / q) for every pair the SOURCE produces, so a
    sampler that stops producing some of them (mode collapse, too-low temperature, float32 Gumbel
    truncation) pays heavily for what it lost, while KL(q || p) would charge only for the pairs it
    still makes and reward dropping everything unlikely. Pairs the source never makes (p = 0) add
    nothing directly but take mass from the pairs it does make. True samples score close to 0, the
    remainder being finite-sample noise of about (support size) / (2 * pairs) plus the smoothing,
    which shrinks as samples are added. Needs the dense bigram table (vocab <= DENSE_MAX_VOCAB).
    """
    if smoothing < 0:
        raise ValueError(f"bigram_kl: smoothing must be >= 0, got {smoothing}")
    p = source.bigram_distribution()
    counts = bigram_counts(samples, source.vocab_size)
    q = (counts + smoothing) / (counts.sum() + smoothing * counts.size)
    on = p > 0
    with np.errstate(divide="ignore"):  # smoothing = 0 and a pair never sampled: KL is +inf
        return float((p[on] * (np.log(p[on]) - np.log(q[on]))).sum())


def support_split(source: MarkovSource, samples: np.ndarray | torch.Tensor) -> dict[str, float | None]:
    """The exact NLL split so that no headline hinges on ``data.synthetic.leak`` alone.

    invalid_rate: the share of transitions outside the source's sparse support (each priced
    log(V / leak) nats by the exact NLL: 9.68 at V = 16, leak = 1e-3, so a few of them make up much of
    a few-step sampler's NLL, in a unit set by an arbitrary constant); mean over sequences of each
    sequence's share, with its SE. valid_nll: -log P(x_t | x_t-1) per *valid* transition (pooled over
    the samples: their sum over their count), nearly free of the leak (it enters as log(1 - leak)),
    with the delta-method SE of that ratio. None when a measure has no transition to average.
    """
    x = _as_numpy(samples)
    if x.shape[1] < 2:
        return {"invalid_rate": None, "invalid_rate_se": None, "valid_nll": None, "valid_nll_se": None}
    ok = source.in_support(x)
    rate = 1.0 - ok.mean(axis=1)
    nll = np.where(ok, source.transition_nll(x), 0.0).sum(axis=1)
    cnt = ok.sum(axis=1).astype(np.float64)
    n = x.shape[0]
    out: dict[str, float | None] = {"invalid_rate": float(rate.mean()),
                                    "invalid_rate_se": float(rate.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
                                    "valid_nll": None, "valid_nll_se": None}
    if cnt.sum() > 0:
        v = float(nll.sum() / cnt.sum())
        psi = (nll - v * cnt) / cnt.mean()  # the ratio's influence per sequence
        out["valid_nll"] = v
        out["valid_nll_se"] = float(psi.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return out


def markov_quality(source: MarkovSource, samples: np.ndarray | torch.Tensor,
                   smoothing: float = 0.01) -> dict[str, float]:
    """Everything measured against the synthetic source, as one flat dict for metrics.json."""
    x = _as_numpy(samples)
    nll = exact_nll(source, x)
    floor = source.sequence_entropy_per_token(x.shape[1])
    out = {"nll": nll.mean, "nll_se": nll.se, "nll_floor": floor, "nll_gap": nll.mean - floor,
           "entropy": unigram_entropy(x), **support_split(source, x)}
    if source.vocab_size <= DENSE_MAX_VOCAB:
        out["bigram_kl"] = bigram_kl(source, x, smoothing)
    return out


# --------------------------------------------------------------------------------------------------
# Sample entropy
# --------------------------------------------------------------------------------------------------
def unigram_entropy(samples: np.ndarray | torch.Tensor) -> float:
    """Mean over sequences of the entropy (nats) of each sequence's own token histogram: the
    "sample entropy" MDLM/SDTT report beside generative perplexity."""
    return float(np.mean(sequence_entropies(samples)))


def sequence_entropies(samples: np.ndarray | torch.Tensor) -> np.ndarray:
    """The entropy (nats) of each sequence's own token histogram, float64 [n] (``unigram_entropy``
    is their mean; the per-sequence values give its standard error and pair models sample by sample)."""
    x = np.sort(_as_numpy(samples), axis=1)
    n, length = x.shape
    # Runs of equal ids in each sorted row are that row's histogram.
    starts = np.ones_like(x, dtype=bool)
    starts[:, 1:] = x[:, 1:] != x[:, :-1]
    run_id = np.cumsum(starts.ravel()) - 1
    counts = np.bincount(run_id).astype(np.float64)
    run_row = np.nonzero(starts.ravel())[0] // length
    sum_clogc = np.bincount(run_row, weights=counts * np.log(counts), minlength=n)
    return math.log(length) - sum_clogc / length


# --------------------------------------------------------------------------------------------------
# Generative perplexity
# --------------------------------------------------------------------------------------------------
def gen_ppl(judge: JudgeFn, samples: np.ndarray | torch.Tensor) -> float:
    """exp(mean NLL over all scored tokens) of the samples under the judge."""
    logp = judge(torch.from_numpy(_as_numpy(samples)))
    return float(torch.exp(-logp.double().mean()))


class HFJudge:
    """Any transformers causal LM saved in ``local_dir`` (safetensors; never downloaded).

    Scores tokens 1..L-1 given their prefix (the MDLM convention: the first token has no context),
    or all L tokens when ``bos_id`` is given and prepended. Ids must be in the judge's vocabulary,
    i.e. samples of a model trained with the judge's tokenizer (GPT-2 for GPT-2 judges).
    """

    def __init__(self, local_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 16,
                 bos_id: int | None = None, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM  # heavy: only judges pay for it

        path = Path(local_dir)
        if not path.is_dir():
            raise JudgeError(f"judge model directory not found: {path} (eval.judge)")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, KeyError) as e:
            raise JudgeError(f"{path}: cannot load a causal LM with safetensors weights: {e}") from None
        # Cast after loading: the dtype keyword of from_pretrained changed name across versions.
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.bos_id = bos_id
        self.vocab_size: int = model.config.vocab_size
        self.max_len: int | None = getattr(model.config, "max_position_embeddings", None)
        self.name = path.resolve().name

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise JudgeError(f"judge {self.name}: ids must lie in [0, {self.vocab_size}); got "
                             f"[{int(ids.min())}, {int(ids.max())}] (samples from another tokenizer?)")
        length = ids.shape[1] + (self.bos_id is not None)
        if self.max_len is not None and length > self.max_len:
            raise JudgeError(f"judge {self.name}: {length} positions exceed its context of {self.max_len}")
        out = []
        for chunk in ids.split(self.batch_size):
            x = chunk.to(self.device, torch.long)
            if self.bos_id is not None:
                x = torch.cat([torch.full_like(x[:, :1], self.bos_id), x], dim=1)
            logits = self.model(x).logits[:, :-1].float()
            out.append(_token_log_probs(logits, x[:, 1:]))
        return torch.cat(out)


class OwnARJudge:
    """The project's causal DiT (``DiT(cfg, causal=True)``) as a judge: the input is BOS = MASK id
    = V followed by the first L - 1 tokens, and the logits at position i score token i, so all L
    tokens are scored. The MASK column is dropped: the judge's law is over the V real tokens."""

    def __init__(self, model: nn.Module, batch_size: int = 64):
        if getattr(model, "causal", True) is False:
            raise JudgeError("OwnARJudge needs the causal model, DiT(cfg, causal=True): a bidirectional "
                             "model would see the tokens it scores")
        self.model = model
        self.vocab_size: int = model.cfg.vocab_size
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise JudgeError(f"OwnARJudge: ids must lie in [0, {self.vocab_size}); got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()  # no dropout while judging; the caller's mode is restored below
        try:
            out = []
            for chunk in ids.split(self.batch_size):
                x = chunk.to(device, torch.long)
                bos = torch.full_like(x[:, :1], self.vocab_size)
                logits = self.model(torch.cat([bos, x[:, :-1]], dim=1))[..., :self.vocab_size]
                out.append(_token_log_probs(logits, x))
        finally:
            self.model.train(was_training)
        return torch.cat(out)


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, float64 on the CPU. cross_entropy does not keep a
    second [B, T, V] tensor of log-probs (3 GB for GPT-2's vocabulary at batch 16 x 1024)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return -nll.view(targets.shape).double().cpu()
