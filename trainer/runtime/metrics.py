"""Rank-0 metrics: TensorBoard under ``<run>/tb/`` plus the same scalars in ``<run>/metrics.jsonl``.

The JSONL file is the machine-readable record (plots, tests, pipeline decisions): one object per
line, ``{"step", "tag", "value", "time"}``, appended and flushed per call so a killed job keeps what
it logged. On ranks other than 0 every method is a no-op, so call sites need no rank checks.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.runtime import dist


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool | None = None):
        self.enabled = dist.is_main() if enabled is None else enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # slow import; rank 0 only

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        lines = []
        for tag, value in values.items():
            v = float(value)
            self._tb.add_scalar(tag, v, global_step=step, walltime=now)
            # JSON has no NaN/inf; keep the record valid and still say what happened.
            jv: Any = v if math.isfinite(v) else str(v)
            lines.append(json.dumps({"step": int(step), "tag": tag, "value": jv, "time": now}))
        self._jsonl.write("".join(line + "\n" for line in lines))
        self._jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, global_step=step)

    def figure(self, step: int, tag: str, fig: Any) -> None:
        """A matplotlib figure as a TensorBoard image."""
        if self.enabled:
            self._tb.add_figure(tag, fig, global_step=step)

    def config(self, cfg: Any) -> None:
        """The resolved config as TensorBoard text (tag "config"), shown as a code block."""
        if not self.enabled:
            return
        from trainer.config import to_yaml

        body = to_yaml(cfg) if not isinstance(cfg, str) else cfg
        self.text(0, "config", "\n".join("    " + line for line in body.splitlines()))

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """TensorBoard's hparams summary (the HPARAMS tab: one row per run, its settings and its final
        metrics), written beside the run's events under ``tb/hparams``."""
        if self.enabled:
            self._tb.add_hparams(dict(hparams), {k: float(v) for k, v in metrics.items()}, run_name="hparams")

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None
            self.enabled = False

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Throughput:
    """Tokens/s and samples/s over the interval since the last ``rates()`` call.

    Pass global counts (summed over ranks) to ``add`` to get the job's throughput.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._samples = 0
        self._tokens = 0

    def add(self, samples: int, tokens: int) -> None:
        self._samples += samples
        self._tokens += tokens

    def rates(self, reset: bool = True) -> dict[str, float]:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        out = {"tokens_per_s": self._tokens / dt, "samples_per_s": self._samples / dt}
        if reset:
            self.reset()
        return out


# Peak dense bf16 tensor FLOP/s (vendor datasheets, no sparsity), matched against
# torch.cuda.get_device_name() in order: the first pattern found in the name wins. A device not listed
# gets no MFU (a wrong peak would be worse than none).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device by its CUDA name (``NVIDIA H100 80GB HBM3``), or None."""
    return next((peak for pattern, peak in PEAK_BF16_FLOPS if pattern in device_name), None)


class GpuStats:
    """GPU scalars for TensorBoard: peak memory since the last call (``gpu/peak_mem_gb``, this
    rank's) and model FLOP utilisation ``train/mfu`` = 6 N tokens/s / (world size x device peak),
    with N the trained parameters and tokens/s the job's. Empty without CUDA; no MFU on a device
    missing from PEAK_BF16_FLOPS."""

    def __init__(self, n_params: int, world_size: int) -> None:
        import torch

        self.on = torch.cuda.is_available()
        self.n, self.world = n_params, max(1, world_size)
        self.peak = peak_bf16_flops(torch.cuda.get_device_name()) if self.on else None

    def scalars(self, tokens_per_s: float) -> dict[str, float]:
        if not self.on:
            return {}
        import torch

        out = {"gpu/peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
        torch.cuda.reset_peak_memory_stats()
        if self.peak:
            out["train/mfu"] = 6.0 * self.n * tokens_per_s / (self.world * self.peak)
        return out


class DataWaitTimer:
    """Fraction of wall time spent waiting for input, since the last ``fraction()`` call.

    Time each fetch (``with timer.waiting(): batch = next(it)``). Near 0 is healthy; a large value
    means the accelerator is starved by the data pipeline.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._waited = 0.0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self._waited += time.perf_counter() - t

    def fraction(self, reset: bool = True) -> float:
        total = max(time.perf_counter() - self._t0, 1e-9)
        frac = min(1.0, self._waited / total)
        if reset:
            self.reset()
        return frac
