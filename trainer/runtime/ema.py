"""Exponential moving average of model weights.

Design (chosen for being simple and obviously correct under every ZeRO stage): every rank keeps a
full fp32 copy of the averaged weights, replicated. The EMA never sees sharding: it is fed full
parameters by whoever owns the model. engine.py does that, reading the parameters directly under
ZeRO 0-2 (each rank holds them whole) and inside ``deepspeed.zero.GatheredParameters`` under ZeRO-3
(one extra all-gather per step). Cost: one fp32 model per rank (3.5 GB for the 863M shape), which
the GPUs this targets can afford; a sharded EMA would save that at the price of resharding on every
world-size change. Saved as fp32 safetensors, so save/restore is bit-exact.

The average tracks the weights the forward pass uses (bf16 on GPU, fp32 on CPU), in fp32.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


class EMA:
    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fold in one step of full parameters; the first call copies them."""
        for name, p in named_params:
            src = p.detach().to(dtype=torch.float32)
            cur = self.shadow.get(name)
            if cur is None:
                self.shadow[name] = src.clone()
            else:
                # lerp_: cur += (1 - decay) * (src - cur), one fused kernel, deterministic.
                cur.lerp_(src.to(cur.device), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU fp32 tensors, ready for safetensors."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                        expect_shapes: Mapping[str, tuple[int, ...]] | None = None, source: str = "EMA") -> None:
        if expect_shapes is not None:
            got = {k: tuple(v.shape) for k, v in state.items()}
            want = {k: tuple(s) for k, s in expect_shapes.items()}
            if got != want:
                bad = sorted(set(got) ^ set(want)) or [k for k in got if got[k] != want[k]]
                raise ValueError(f"{source}: EMA tensors do not match the model at {', '.join(bad[:5])}")
        self.shadow = {k: v.detach().to(device=device, dtype=torch.float32).clone() for k, v in state.items()}
