"""Named weight transforms that weight rules refer to. Each takes the source tensors (in the rule's order) and the
model config and returns the full, unsharded kiln tensor."""

from __future__ import annotations

from typing import Callable

import torch

from kiln.config import ModelConfig
from kiln.models.family import identity


def dbrx_experts_w13(tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """DBRX's fused gate (w1) and up (v1) parameters, each [experts * ffn, hidden] [DBX modeling_dbrx.py], into
    kiln's w13 [experts, 2 * ffn, hidden] with rows gate then up."""
    w1, v1 = (t.reshape(config.moe_num_experts, config.intermediate_size, config.hidden_size) for t in tensors)
    return torch.cat([w1, v1], dim=1)


def dbrx_experts_w2(tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """DBRX's down parameter is stored [experts * ffn, hidden] and used without a transpose (`act @ W2`); kiln's w2
    is [experts, hidden, ffn] so that every expert is applied as `act @ w2[e].T` like a Linear."""
    w2 = tensors[0].reshape(config.moe_num_experts, config.intermediate_size, config.hidden_size)
    return w2.transpose(1, 2).contiguous()


def stack_expert_pairs(tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Per-expert (gate, up) pairs [gate_0, up_0, gate_1, up_1, ...], each [ffn, X] -> [experts, 2 * ffn, X] with rows
    gate then up (DBRX "converted"'s w1/v1 Linears into kiln's w13). Acts on rows only, so it fuses a quantized
    layer's values, scales and zero points alike (X = inputs or groups)."""
    return torch.stack([torch.cat(tensors[i:i + 2], dim=0) for i in range(0, len(tensors), 2)])


def stack_experts(tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """One [out, X] tensor per expert -> [experts, out, X] (DBRX "converted"'s w2 Linears into kiln's w2)."""
    return torch.stack(tensors)


def concat_rows(tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Fuse several [out_i, in] weights into one [sum(out_i), in] (e.g. gate and up into gate_up)."""
    return torch.cat(tensors, dim=0)


def l2_normalize_rows(tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Baichuan2's NormHead divides each vocabulary row by its L2 norm at inference [BC2]; done once here, in float32,
    and left in float32 so that the converter rounds once, to the engine's dtype (rounding to the checkpoint's bf16
    first cost a float32 engine ~2e-3 relative error in its logits)."""
    return torch.nn.functional.normalize(tensors[0].float(), dim=1)


TRANSFORMS: dict[str, Callable[[list[torch.Tensor], ModelConfig], torch.Tensor]] = {
    "identity": identity,
    "dbrx_experts_w13": dbrx_experts_w13,
    "dbrx_experts_w2": dbrx_experts_w2,
    "l2_normalize_rows": l2_normalize_rows,
    "concat_rows": concat_rows,
    "stack_expert_pairs": stack_expert_pairs,
    "stack_experts": stack_experts,
}
