"""Kernels: Triton on CUDA, plain torch elsewhere. A `KernelSet` is chosen once, when an engine is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kiln.kernels import reference


@dataclass(frozen=True)
class KernelSet:
    """The implementations of kiln's hot operations that one engine uses (see reference.py for the contracts)."""

    name: str
    write_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    fused_moe: Callable[..., torch.Tensor]


REFERENCE = KernelSet(
    name="torch",
    write_kv_cache=reference.write_kv_cache,
    paged_attention=reference.paged_attention,
    fused_moe=reference.fused_moe,
)


def select_kernels(device: torch.device, backend: str = "auto") -> KernelSet:
    """Pick the kernels for `device`: "triton" on CUDA when asked or by default, "torch" everywhere else."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}; choose auto, torch or triton")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return REFERENCE
    from kiln.kernels.triton_ops import triton_kernels  # imported only when chosen: triton is optional on CPU

    return triton_kernels()
