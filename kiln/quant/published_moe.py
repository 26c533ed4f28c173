"""Published GPTQ/AWQ checkpoints of a mixture-of-experts model (DBRX "converted", whose experts AutoGPTQ quantized one
Linear at a time): what kiln's fused group-wise MoE runs exactly, checked at `kiln convert` before any tensor is
written.

- The weight map stacks the experts' published values, scales and zero points into kiln's fused w13/w2 unchanged
  (kiln.models.transforms' `stack_expert_pairs` / `stack_experts`): exact, since group-wise packing runs along the
  input dim and every expert of one weight shares its inputs and group size.
- The fused MoE's Triton kernels take groups that are a power of two of at least 32; another group size would fail on
  the GPU's first step, so it is refused here. group_size -1 (one group per row) is always accepted
  (PublishedFormat.quant_config widens it to a power of two).
- The fused MoE takes no act-order g_idx. A desc_act checkpoint whose g_idx are `k // group_size` in every layer
  anyway runs as plain groups; one with a permuted g_idx is refused, naming the layer.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from kiln.config import ConfigError, ModelConfig
from kiln.quant.published_group_wise import PublishedFormat


class TensorNames(Protocol):
    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


def moe_format(fmt: PublishedFormat, checkpoint: TensorNames, config: ModelConfig, model_dir: Path) -> PublishedFormat:
    """`fmt` as kiln runs it for `config` (unchanged for a dense model); raises one line for what the fused MoE cannot
    run exactly."""
    if not config.is_moe:
        return fmt
    group = fmt.group_size
    if group != -1 and (group < 32 or group & (group - 1)):
        raise ConfigError(f"{model_dir} is a {fmt.quant_algo} checkpoint with group_size {group}: kiln's fused MoE "
                          "runs groups of 32, 64, 128, ... (a power of two of at least 32) or -1; requantize with "
                          "such a group size, or convert the unquantized checkpoint and let kiln calibrate")
    if not fmt.act_order:
        return fmt
    permuted = first_permuted_g_idx(checkpoint, group)
    if permuted is not None:
        raise ConfigError(f"{model_dir}: {permuted} is an act-order permutation (desc_act true), and kiln's fused MoE "
                          "runs groups of consecutive inputs only; requantize with desc_act false, or convert the "
                          "unquantized checkpoint and let kiln calibrate (--weight_only_precision int4_gptq)")
    return replace(fmt, act_order=False)  # desc_act said, but every group is plain: nothing to permute


def first_permuted_g_idx(checkpoint: TensorNames, group_size: int) -> str | None:
    """The first `<layer>.g_idx` (in name order) that is not `k // group_size`, or None. Group indices are one int32
    per input feature, so reading every layer's costs little next to its weights."""
    for name in sorted(n for n in checkpoint.names() if n.endswith(".g_idx")):
        g_idx = checkpoint.get(name).long()
        group = g_idx.numel() if group_size == -1 else group_size
        if g_idx.dim() != 1 or not torch.equal(g_idx, torch.arange(g_idx.numel()) // group):
            return name
    return None
