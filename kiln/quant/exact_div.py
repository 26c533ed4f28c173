"""Quantization scales divided the same way on every device.

`tensor / 448.0` on CUDA multiplies by the float32 reciprocal of the Python number (torch's optimization for a CPU
scalar divisor, documented to lose a bit), while the CPU and kiln's Triton kernels (`div_rn`) divide: an amax / 448
or / 127 could then differ by one unit in the last place between the torch reference on a GPU and the kernels, and
between a row-parallel rank (whose per-token scale comes from torch after the max over the ranks) and one rank."""

from __future__ import annotations

import torch


def divided(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor, one IEEE division per element (rounded to nearest) on the CPU and on CUDA alike."""
    return t / torch.full_like(t, divisor)
