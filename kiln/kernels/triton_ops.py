"""The Triton kernel set: kiln's hot operations as Triton kernels, with the signatures of reference.py."""

from __future__ import annotations

import torch

from kiln.kernels import KernelSet, reference
from kiln.kernels.triton_attention import paged_attention
from kiln.kernels.triton_kv_cache import write_kv_cache
from kiln.kernels.triton_norm import add_norm
from kiln.kernels.triton_moe import MoeConfig, MoeKey, fused_moe, register_moe_config, tune_fused_moe
from kiln.kernels.triton_moe_group_wise import fused_moe_group_wise
from kiln.kernels.triton_moe_w8a8 import fused_moe_fp8, fused_moe_sq
from kiln.kernels.triton_moe_weight_only import fused_moe_weight_only

__all__ = ["triton_kernels", "write_kv_cache", "paged_attention", "fused_moe", "add_norm", "tune_fused_moe", "MoeConfig",
           "register_moe_config"]


def triton_kernels(moe_configs: dict[MoeKey, MoeConfig] | None = None,
                   device: torch.device | None = None) -> KernelSet:
    """The "triton" KernelSet. `moe_configs` (tuned at build time by tune_fused_moe, keyed by
    triton_moe.moe_config_key) are registered for fused_moe before the set is returned. On a CUDA `device` without
    FP8 tensor cores (before sm_89) the FP8 experts keep the torch reference, as the FP8 dense layers do."""
    for key, config in (moe_configs or {}).items():
        register_moe_config(key, config)
    fp8_moe = fused_moe_fp8 if device is None or _has_fp8_dot(device) else reference.fused_moe_fp8
    return KernelSet(name="triton", write_kv_cache=write_kv_cache, paged_attention=paged_attention,
                     fused_moe=fused_moe, add_norm=add_norm, fused_moe_weight_only=fused_moe_weight_only,
                     fused_moe_group_wise=fused_moe_group_wise, fused_moe_sq=fused_moe_sq, fused_moe_fp8=fp8_moe)


def _has_fp8_dot(device: torch.device) -> bool:
    """Triton's FP8 tl.dot: CUDA sm_89 (Ada) or newer; the CPU only runs the interpreter, which emulates it."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)
