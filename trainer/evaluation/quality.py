"""Quality of generated samples: exact likelihood under the synthetic source, sample entropy, bigram
coverage, and generative perplexity under an autoregressive judge (trainer/evaluation/judges.py).

Everything is a pure function of the samples (int [n, L], numpy or torch) and of the judge. Sample
entropy goes next to every likelihood-style number: a sampler that collapses onto likely tokens
looks better on NLL and gen-PPL while losing diversity, and only the entropy (and the bigram KL
below) shows it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from trainer.data.synthetic import DENSE_MAX_VOCAB, MarkovSource
from trainer.errors import BadInput

# A judge maps token ids Long[B, L] to the log-probabilities of the tokens it scores, Float[B, T]
# (T = L - 1 without a BOS, L with one), batched inside, without gradients: the judges of
# trainer/evaluation/judges.py are (``score_ids``), and so is any such function.
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
