"""The exact teacher of a synthetic Markov source: the Bayes-optimal MDLM denoiser, shaped like a DiT.

For a first-order chain with transition matrix P whose sequences start from its stationary law pi,
the posterior of a masked position i given every visible token of x_t depends only on the nearest
visible neighbours, a at l < i and b at r > i (the Markov property):

    p(x_i = v | visible) ∝ [P^(i-l)]_{a,v} · [P^(r-i)]_{v,b}

with pi_v in place of the left factor when nothing to the left is visible and 1 in place of the
right one when nothing to the right is. The masking of MDLM's forward process is independent of the
tokens, so this is p(x0_i | x_t) at every t: the exact denoiser is time-agnostic, like the DiT
without time conditioning. ``MarkovOracle`` wraps it in the DiT's forward signature (raw logits
[B, L, V + 1] or [N, V + 1] for ``rows``; the MASK column -inf), so ``sampling.make_denoiser``, the
targets job, the online distill source and the evaluation use it like any trained teacher. Its
"weights" are P and pi (float64), written as an export like any model's (trainer.jobs.oracle_teacher).

Pure: no I/O, tensors in and out; float64 throughout (the logits are returned in float32 like the DiT's).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.errors import BadInput

KIND = "markov_oracle"  # export.json's "model" field of an oracle export (a DiT export has none or "dit")
# The power table [L + 1, V, V] is held in float64; above this many entries it is refused (4 GiB).
MAX_TABLE_ENTRIES = 1 << 29


class OracleError(BadInput, ValueError):
    """An exact teacher that cannot be built (the message names the config key or the tensor)."""


def transition_powers(transition: Tensor, max_power: int) -> Tensor:
    """P^0 .. P^max_power as a float64 table [max_power + 1, V, V] (P^0 = I)."""
    p = transition.double()
    out = [torch.eye(p.shape[0], dtype=torch.float64, device=p.device)]
    for _ in range(max_power):
        out.append(out[-1] @ p)
    return torch.stack(out)


def markov_posterior(x: Tensor, mask_id: int, powers: Tensor, stationary: Tensor) -> Tensor:
    """p(x_i | the visible tokens of x) at every position, float64 [B, L, V].

    x: int64 [B, L] with MASK = ``mask_id``; powers: ``transition_powers`` with max_power >= L;
    stationary: pi [V]. A visible position gets the one-hot of its own token (its nearest visible
    neighbours are itself: P^0 = I on both sides), which SUBS would impose anyway.
    """
    b, length = x.shape
    v = powers.shape[-1]
    vis = x != mask_id
    pos = torch.arange(length, device=x.device).expand(b, length)
    # nearest visible position at or left of i (-1: none), at or right of i (L: none)
    left = torch.where(vis, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    right = torch.where(vis, pos, torch.full_like(pos, length)).flip(1).cummin(dim=1).values.flip(1)
    has_left, has_right = left >= 0, right < length
    tok_left = x.gather(1, left.clamp(min=0)).clamp(max=v - 1)  # clamped where absent (then unused)
    tok_right = x.gather(1, right.clamp(max=length - 1)).clamp(max=v - 1)
    d_left = (pos - left).clamp(max=powers.shape[0] - 1)
    d_right = (right - pos).clamp(max=powers.shape[0] - 1)
    lf = torch.where(has_left[..., None], powers[d_left, tok_left], stationary.double())  # [B, L, V]: row a of P^dl
    rf = torch.where(has_right[..., None], powers.transpose(1, 2)[d_right, tok_right], 1.0)  # column b of P^dr
    joint = lf * rf
    return joint / joint.sum(-1, keepdim=True)


class MarkovOracle(nn.Module):
    """The exact denoiser of a Markov source as a model: ``forward(x, sigma=None, rows=None)``.

    Returns log p(x0 | x_t) as float32 logits with V + 1 columns (MASK at -inf), [B, L, V + 1], or
    [N, V + 1] for the positions ``rows`` selects (row-major): what ``DiT.forward`` returns, so every
    consumer's ``masked_log_probs`` leaves it unchanged. sigma is ignored (time-agnostic).
    Its state dict holds ``transition`` [V, V] and ``stationary`` [V] (float64); the power table is
    rebuilt from them.
    """

    def __init__(self, transition: Tensor, stationary: Tensor, seq_len: int):
        super().__init__()
        transition, stationary = transition.double(), stationary.double()
        v = transition.shape[0]
        if transition.dim() != 2 or transition.shape != (v, v) or stationary.shape != (v,):
            raise OracleError(f"exact teacher: transition {tuple(transition.shape)} and stationary "
                              f"{tuple(stationary.shape)} do not describe one chain")
        # A zero entry would leave the posterior undefined (0/0) for a context the chain cannot
        # produce, and few-step samples do produce them: the source's leak keeps every entry positive.
        if not bool((transition > 0).all()) or not bool((stationary > 0).all()):
            raise OracleError("exact teacher: the chain has zero-probability transitions (data.synthetic.leak=0); "
                              "teacher.source=oracle needs data.synthetic.leak > 0")
        if (seq_len + 1) * v * v > MAX_TABLE_ENTRIES:
            raise OracleError(f"exact teacher: a power table of (data.seq_len + 1) x V^2 = {(seq_len + 1) * v * v} "
                              f"float64 entries is over the limit {MAX_TABLE_ENTRIES}; use a smaller "
                              "data.synthetic.vocab_size or data.seq_len")
        self.vocab_size, self.seq_len = v, seq_len
        self.register_buffer("transition", transition)
        self.register_buffer("stationary", stationary)
        self.register_buffer("powers", transition_powers(transition, seq_len), persistent=False)

    @classmethod
    def from_state(cls, state: dict[str, Tensor], seq_len: int) -> MarkovOracle:
        missing = {"transition", "stationary"} - set(state)
        if missing:
            raise OracleError(f"exact teacher: the state has no {', '.join(sorted(missing))}")
        return cls(state["transition"], state["stationary"], seq_len)

    @property
    def device(self) -> torch.device:
        """Where it computes (as a training engine says), so the validation loop can score it too."""
        return self.transition.device

    def forward(self, x: Tensor, sigma: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        if x.shape[1] > self.seq_len:
            raise ValueError(f"exact teacher: sequences of length {x.shape[1]} > its data.seq_len={self.seq_len}")
        post = markov_posterior(x, self.vocab_size, self.powers, self.stationary)
        if rows is not None:
            post = post[rows]
        logits = torch.full((*post.shape[:-1], self.vocab_size + 1), float("-inf"), dtype=torch.float32,
                            device=post.device)
        logits[..., :self.vocab_size] = post.log().float()
        return logits
