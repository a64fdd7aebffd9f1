"""Timing and reporting for tools/bench.py: interleaved repetitions, ratios of medians with their
per-repetition range, CPU-time cross-checks, tables and the closing JSON line."""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU_TIMES: dict[str, list[float]] = {}  # process CPU time of the last interleaved() call, per variant


def interleaved(variants: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device,
                after: Callable[[str, Any], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall time of every variant, ``repeats`` times, interleaved: repetition r runs all variants in
    an order rotated by r, so no variant always runs first or after the same neighbour. ``after``
    (untimed) cleans up after a call. Returns (times per variant, last result per variant).

    The process CPU time of each call goes to ``CPU_TIMES``: on a shared CPU, a single-threaded
    benchmark's CPU time barely depends on the other tenants (wall time does), so its ratio is a
    noise-robust cross-check of the wall-time ratio (it omits waits: fsync, I/O, other processes)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    CPU_TIMES.clear()
    CPU_TIMES.update({n: [] for n in names})
    results: dict[str, Any] = {}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            out = variants[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            CPU_TIMES[name].append(time.process_time() - c0)
            results[name] = out
            if after is not None:
                after(name, out)
    return times, results


def cpu_ratio(num: str, den: str) -> Ratio:
    """Ratio.of on the CPU times of the last interleaved() call."""
    return Ratio.of(CPU_TIMES[num], CPU_TIMES[den])


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


@dataclass
class Ratio:
    """num/den of two interleaved variants: the ratio of medians, and the range of the per-repetition
    ratios (a noise gauge: a wide range means the machine was busy)."""

    value: float
    lo: float
    hi: float

    @classmethod
    def of(cls, num: Sequence[float], den: Sequence[float]) -> Ratio:
        paired = [a / b for a, b in zip(num, den) if b > 0]
        return cls(med(num) / med(den), min(paired, default=math.nan), max(paired, default=math.nan))

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}-{self.hi:.3f}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    return str(x)


def emit(result: dict[str, Any]) -> None:
    """The machine-readable result: always the last line of stdout."""
    print(json.dumps(result, sort_keys=True, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, Ratio):
        return o.value
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def goal_line(name: str, value: float, goal: float, higher_is_better: bool = True) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    cmp = ">=" if higher_is_better else "<="
    return f"{name}: {value:.3f} (goal {cmp} {goal}) {'MET' if ok else 'MISSED'}"


