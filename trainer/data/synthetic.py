"""The synthetic source: a seeded sparse first-order Markov chain with a small uniform leak, whose
likelihood, entropy rate and bigram law are exact, so model quality is measured against the truth.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from trainer.config import SyntheticConfig
from trainer.data.errors import DataError

# Above this vocabulary the transition matrix is not materialised: the stationary law comes from
# sparse power iteration and dense tables are refused (50k^2 float64 would be 20 GB).
DENSE_MAX_VOCAB = 2048
# Dirichlet draws with a small concentration underflow to exactly 0; raising them to this floor keeps
# every listed successor a real edge, so the irreducibility/aperiodicity checks mean something.
_MIN_PROB = 1e-12
_MAX_REDRAWS = 100
_POWER_TOL = 1e-13
_POWER_MAX_ITERS = 200_000


class MarkovSource:
    """A seeded first-order Markov chain over ``vocab_size`` states (= tokens): sparse plus a leak.

    Row i is P_i = (1 - leak) S_i + leak / V, where S_i puts Dirichlet(``concentration``) weights on
    ``branching`` distinct successors. One successor of every state lies on a random Hamiltonian
    cycle through all states, so S alone is irreducible; with ``branching >= 2`` the successor sets
    are re-drawn until S is also aperiodic (``branching == 1`` is the cycle itself, periodic, but with
    a unique uniform stationary law). Sequences start from the stationary law of P, so every position
    is stationary and consecutive pairs follow ``bigram_distribution`` exactly.

    Sparse form (float64): ``succ[i, k]`` is the k-th successor of state i and ``probs[i, k]`` its
    weight in S; ``stationary`` is the stationary law of P. Nothing V x V is built unless asked for
    (and then only up to vocab 2048), so a GPT-2-sized vocabulary works.
    """

    def __init__(self, cfg: SyntheticConfig):
        if (cfg.vocab_size < 2 or not 1 <= cfg.branching <= cfg.vocab_size or cfg.concentration <= 0
                or not 0 <= cfg.leak < 1):
            raise DataError(f"bad data.synthetic: vocab_size={cfg.vocab_size}, branching={cfg.branching}, "
                            f"concentration={cfg.concentration}, leak={cfg.leak}")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.leak = cfg.leak
        rng = np.random.default_rng(cfg.seed)
        for _ in range(_MAX_REDRAWS):
            succ, probs = _draw_chain(cfg.vocab_size, cfg.branching, cfg.concentration, rng)
            if cfg.branching == 1 or _period(succ) == 1:
                break
        else:
            raise DataError(f"data.synthetic: no aperiodic chain in {_MAX_REDRAWS} draws "
                            f"(vocab_size={cfg.vocab_size}, branching={cfg.branching})")
        self.succ: np.ndarray = succ
        self.probs: np.ndarray = probs
        # Cumulative rows with an exact 1.0 at the end: a uniform u in (0, 1] always finds a successor.
        self._cum = np.cumsum(probs, axis=1)
        self._cum[:, -1] = 1.0
        self.stationary: np.ndarray = (self._stationary_dense() if self.vocab_size <= DENSE_MAX_VOCAB
                                       else self._stationary_power())
        self._cum_stationary = np.cumsum(self.stationary)
        self._cum_stationary[-1] = 1.0
        with np.errstate(divide="ignore"):
            self._log_stationary = np.log(self.stationary)

    # -- sampling and likelihood ---------------------------------------------------------------
    def sample(self, n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` independent sequences of length ``seq_len`` (int64 [n, seq_len])."""
        out = np.empty((n, seq_len), dtype=np.int64)
        # u in (0, 1]: the index of the first cumulative value >= u has exactly its own probability.
        out[:, 0] = np.searchsorted(self._cum_stationary, 1.0 - rng.random(n), side="left")
        for t in range(1, seq_len):
            state = out[:, t - 1]
            u = 1.0 - rng.random(n)
            nxt = self.succ[state, (self._cum[state] < u[:, None]).sum(axis=1)]
            if self.leak > 0:
                jump = rng.random(n) < self.leak
                nxt = np.where(jump, rng.integers(0, self.vocab_size, n), nxt)
            out[:, t] = nxt
        return out

    def log_prob(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Exact log-likelihood of each sequence (float64 [n]); -inf only if leak = 0 and a
        transition is not in the sparse support."""
        x = self._check_tokens(seqs)
        out = np.empty(x.shape[0], dtype=np.float64)
        # Chunk the rows: the successor match below is [rows, L - 1, branching] wide.
        rows = max(1, (1 << 22) // max(1, x.shape[1] * self.cfg.branching))
        for i in range(0, x.shape[0], rows):
            out[i:i + rows] = self._log_prob_rows(x[i:i + rows])
        return out

    def _log_prob_rows(self, x: np.ndarray) -> np.ndarray:
        prev, nxt = x[:, :-1], x[:, 1:]
        sparse = np.where(self.succ[prev] == nxt[..., None], self.probs[prev], 0.0).sum(axis=-1)
        with np.errstate(divide="ignore"):
            step = np.log((1.0 - self.leak) * sparse + self.leak / self.vocab_size)
        return self._log_stationary[x[:, 0]] + step.sum(axis=1)

    def in_support(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        """bool [n, L - 1]: whether each transition is one of its state's ``branching`` listed successors
        (a transition outside them has probability leak / V only: the leak's, priced log(V / leak))."""
        x = self._check_tokens(seqs)
        return (self.succ[x[:, :-1]] == x[:, 1:, None]).any(axis=-1)

    def transition_nll(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        """-log P(x_t | x_t-1) of every transition, float64 [n, L - 1] (the leak included)."""
        x = self._check_tokens(seqs)
        prev, nxt = x[:, :-1], x[:, 1:]
        sparse = np.where(self.succ[prev] == nxt[..., None], self.probs[prev], 0.0).sum(axis=-1)
        with np.errstate(divide="ignore"):
            return -np.log((1.0 - self.leak) * sparse + self.leak / self.vocab_size)

    def nll_per_token(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Negative log-likelihood per token, nats (float64 [n])."""
        x = self._check_tokens(seqs)
        return -self.log_prob(x) / x.shape[1]

    def _check_tokens(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        x = seqs.detach().cpu().numpy() if isinstance(seqs, torch.Tensor) else np.asarray(seqs)
        if x.ndim != 2 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"Markov source: expected an integer array [n, L], got {x.dtype} {x.shape}")
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise DataError(f"Markov source: token ids must lie in [0, {self.vocab_size}); got "
                            f"[{x.min()}, {x.max()}] (a MASK id left in a sample?)")
        return x.astype(np.int64, copy=False)

    # -- exact information quantities ------------------------------------------------------------
    @property
    def entropy_rate(self) -> float:
        """sum_i pi_i H(P_i), nats per token: the per-token NLL floor of a long sequence."""
        v, eps = self.vocab_size, self.leak
        listed = (1.0 - eps) * self.probs + eps / v
        row_entropy = -(listed * np.log(listed)).sum(axis=1)
        if eps > 0:  # the V - branching states a row reaches by the leak alone
            row_entropy -= (v - self.cfg.branching) * (eps / v) * math.log(eps / v)
        return float(self.stationary @ row_entropy)

    @property
    def stationary_entropy(self) -> float:
        """H(pi), nats: the entropy of the first token."""
        pi = self.stationary[self.stationary > 0]
        return float(-(pi * np.log(pi)).sum())

    def sequence_entropy_per_token(self, seq_len: int) -> float:
        """(H(pi) + (L - 1) h) / L: the exact expected per-token NLL of a true sample of length L,
        the floor a perfect model reaches."""
        return (self.stationary_entropy + (seq_len - 1) * self.entropy_rate) / seq_len

    def transition_matrix(self) -> np.ndarray:
        """P as a dense float64 [V, V] table (vocabularies up to 2048)."""
        v = self.vocab_size
        if v > DENSE_MAX_VOCAB:
            raise DataError(f"Markov source: vocab_size={v} is too large for a dense [V, V] table; "
                            f"use the sparse succ/probs/stationary arrays")
        p = np.full((v, v), self.leak / v)
        rows = np.repeat(np.arange(v), self.cfg.branching)
        p[rows, self.succ.ravel()] += (1.0 - self.leak) * self.probs.ravel()  # successors are distinct
        return p

    def bigram_distribution(self) -> np.ndarray:
        """The stationary joint law of consecutive tokens, pi_i P_ij (dense float64 [V, V])."""
        return self.stationary[:, None] * self.transition_matrix()

    def _stationary_dense(self) -> np.ndarray:
        """Exact solve of pi (P - I) = 0 with sum(pi) = 1 (one balance equation is redundant)."""
        v = self.vocab_size
        a = self.transition_matrix().T - np.eye(v)
        a[-1] = 1.0
        rhs = np.zeros(v)
        rhs[-1] = 1.0
        pi = np.clip(np.linalg.solve(a, rhs), 0.0, None)  # rounding can leave -1e-18 on rare states
        return pi / pi.sum()

    def _stationary_power(self) -> np.ndarray:
        """Sparse power iteration pi <- pi P from uniform. It converges: P is aperiodic, or it is the
        deterministic cycle, whose stationary law is the uniform start."""
        v, eps = self.vocab_size, self.leak
        pi = np.full(v, 1.0 / v)
        for _ in range(_POWER_MAX_ITERS):
            flow = np.bincount(self.succ.ravel(), weights=(pi[:, None] * self.probs).ravel(), minlength=v)
            new = (1.0 - eps) * flow + eps / v
            new /= new.sum()
            if np.abs(new - pi).sum() < _POWER_TOL:
                return new
            pi = new
        raise DataError(f"data.synthetic: the chain mixes too slowly to find its stationary law in "
                        f"{_POWER_MAX_ITERS} iterations; raise branching, concentration or leak")


def _draw_chain(vocab: int, branching: int, concentration: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(vocab)
    cycle_next = np.empty(vocab, dtype=np.int64)
    cycle_next[order] = np.roll(order, -1)
    succ = np.empty((vocab, branching), dtype=np.int64)
    succ[:, 0] = cycle_next
    if branching > 1:
        for i in range(vocab):
            # Draw from the V - 1 states other than the cycle successor (self-loops allowed).
            others = rng.choice(vocab - 1, size=branching - 1, replace=False)
            succ[i, 1:] = others + (others >= cycle_next[i])
    probs = rng.dirichlet(np.full(branching, concentration), size=vocab)
    probs = np.maximum(probs, _MIN_PROB)
    return succ, probs / probs.sum(axis=1, keepdims=True)


def _period(succ: np.ndarray) -> int:
    """Period of an irreducible chain's graph: gcd over edges u->v of level(u) + 1 - level(v), with
    levels the breadth-first distances from state 0."""
    level = np.full(succ.shape[0], -1, dtype=np.int64)
    level[0] = 0
    frontier, depth = np.array([0]), 0
    while frontier.size:
        depth += 1
        nbrs = np.unique(succ[frontier])
        frontier = nbrs[level[nbrs] < 0]
        level[frontier] = depth
    return int(np.gcd.reduce(np.abs(level[:, None] + 1 - level[succ]).ravel()))
