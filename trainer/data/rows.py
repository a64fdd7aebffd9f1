"""Which clean row each SDTT sample denoises: the same rule for the targets job and the online student."""
from __future__ import annotations

import numpy as np

PERM_DOMAIN = 0x5D78  # separates these permutations' seeds from every other use of (seed, round, ...)


class RowPicker:
    """Sample i -> train row perm_e[i mod N], e = i // N, perm_e seeded by (seed, round, e): every
    row once per pass, in an order that differs between rounds."""

    def __init__(self, num_rows: int, seed: int, round_idx: int):
        self.n, self.seed, self.round_idx = num_rows, seed, round_idx
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, index: int) -> int:
        epoch = index // self.n
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 2:
                self._perms.clear()
            ss = np.random.SeedSequence([PERM_DOMAIN, self.seed, self.round_idx, epoch])
            perm = self._perms[epoch] = np.random.default_rng(ss).permutation(self.n)
        return int(perm[index % self.n])
