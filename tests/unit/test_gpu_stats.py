"""The device table behind the MFU that TensorBoard gets (trainer/runtime/metrics.py), checked
without a GPU (``make gpu-check``'s own path: tests/tools/test_gpu_check.py)."""
from __future__ import annotations

import pytest

from trainer.runtime.metrics import GpuStats, peak_bf16_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("Tesla V100-SXM2-32GB", None),
    ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_of_known_devices_only(name: str, peak: float | None) -> None:
    assert peak_bf16_flops(name) == peak


def test_gpu_scalars_are_empty_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tools/gpu_check.py measures it")
    assert GpuStats(1_000_000, 8).scalars(1e6) == {}
