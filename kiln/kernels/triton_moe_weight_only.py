"""Launcher of kiln's fused MoE over weight-only per-channel INT8/INT4 experts (contract:
reference.fused_moe_weight_only; kernels in triton_moe_weight_only_kernels.py). The bf16 fused MoE's align and sum
launches (triton_moe.py) around two grouped GEMMs that read the int8 bytes and dequantize in registers. Tiles come
from the fused MoE's table (triton_moe_configs, tuned at build for the engine's shape). Nothing syncs with the host,
so a quantized MoE decode step captures in a CUDA graph."""

from __future__ import annotations

import torch

from kiln.kernels.triton_common import FLOAT_DTYPES, INDEX_DTYPES, cdiv, check_device, check_shape, check_tensor
from kiln.kernels.triton_common import asm_dequant, dot_precision, dot_upcast, while_loops
from kiln.kernels.triton_moe import AlignedRouting, _fitting_stages, _launch_sum, plan_moe_run
from kiln.kernels.triton_moe_configs import MoeConfig
from kiln.kernels.triton_moe_weight_only_kernels import moe_wo_down_kernel, moe_wo_gate_up_kernel

__all__ = ["fused_moe_weight_only"]


def check_quantized_experts(hidden, w13, w2, topk_weights, topk_ids, expert_start, bits) -> tuple[int, int, int]:
    """The checks every quantized fused MoE shares (stored int8 w13/w2 of `bits`-bit values, routing); returns
    (local experts, 2 * ffn, hidden)."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    check_tensor("hidden", hidden, 2, FLOAT_DTYPES)
    device = hidden.device
    check_device(device)
    check_tensor("w13", w13, 3, (torch.int8,), device)
    check_tensor("w2", w2, 3, (torch.int8,), device)
    check_tensor("topk_weights", topk_weights, 2, FLOAT_DTYPES, device, last_dim_contiguous=False)
    check_tensor("topk_ids", topk_ids, 2, INDEX_DTYPES, device, last_dim_contiguous=False)
    per_byte = 2 if bits == 4 else 1
    size = hidden.shape[1]
    experts, two_ffn = w13.shape[0], w13.shape[1]
    if two_ffn % 2 or size % per_byte:
        raise ValueError(f"w13 must stack [gate; up] rows (2 * ffn, got {two_ffn}) over {size} input features "
                         f"({'even for INT4' if bits == 4 else 'any'})")
    check_shape("w13", w13, (experts, two_ffn, size // per_byte))
    check_shape("w2", w2, (experts, size, two_ffn // 2 // per_byte))
    check_shape("topk_weights", topk_weights, tuple(topk_ids.shape))
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows for {hidden.shape[0]} tokens")
    if not isinstance(expert_start, int) or expert_start < 0:
        raise ValueError(f"expert_start must be a non-negative int, got {expert_start!r}")
    return experts, two_ffn, size


def _check(hidden, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, expert_start, bits) -> None:
    experts, two_ffn, size = check_quantized_experts(hidden, w13, w2, topk_weights, topk_ids, expert_start, bits)
    check_tensor("w13_scale", w13_scale, 2, (hidden.dtype, torch.float32), hidden.device)
    check_tensor("w2_scale", w2_scale, 2, (hidden.dtype, torch.float32), hidden.device)
    check_shape("w13_scale", w13_scale, (experts, two_ffn))
    check_shape("w2_scale", w2_scale, (experts, size))


def _launch_gate_up(hidden, w13, s13, act, routing: AlignedRouting, top_k: int, config: MoeConfig, bits: int):
    ffn, size = w13.shape[1] // 2, hidden.shape[1]
    tile = config.up
    block_k = max(32, tile.block_k)
    num_m = routing.block_expert.numel()
    moe_wo_gate_up_kernel[(num_m * cdiv(ffn, tile.block_n),)](
        hidden, w13, s13, act, routing.sorted_ids, routing.block_expert, act.shape[0], top_k, ffn, size,
        w13.shape[2], num_m, hidden.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), act.stride(0),
        BITS=bits, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, GROUP_M=config.group_m,
        EVEN_K=size % block_k == 0, DOT_F32=dot_upcast(hidden.dtype, hidden.device),
        PRECISION=dot_precision(hidden.dtype), ASM=asm_dequant(hidden.dtype, hidden.device),
        WHILE_LOOP=while_loops(hidden.device), num_warps=tile.num_warps,
        num_stages=_fitting_stages(tile, config.block_m, 2, hidden.dtype, hidden.device),
    )


def _launch_down(act, w2, s2, weights, part, routing: AlignedRouting, config: MoeConfig, bits: int):
    size, ffn = w2.shape[1], act.shape[1]
    tile = config.down
    block_k = max(32, tile.block_k)
    num_m = routing.block_expert.numel()
    moe_wo_down_kernel[(num_m * cdiv(size, tile.block_n),)](
        act, w2, s2, part, weights, routing.sorted_ids, routing.block_expert, act.shape[0], size, ffn, w2.shape[2],
        num_m, act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), part.stride(0),
        BITS=bits, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, GROUP_M=config.group_m,
        EVEN_K=ffn % block_k == 0, DOT_F32=dot_upcast(act.dtype, act.device), PRECISION=dot_precision(act.dtype),
        ASM=asm_dequant(act.dtype, act.device),
        WHILE_LOOP=while_loops(act.device), num_warps=tile.num_warps,
        num_stages=_fitting_stages(tile, config.block_m, 1, act.dtype, act.device),
    )


def fused_moe_weight_only(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden (INT4: hidden / 2)] int8
    w13_scale: torch.Tensor,  # [local_experts, 2 * ffn]
    w2: torch.Tensor,  # [local_experts, hidden, ffn (INT4: ffn / 2)] int8
    w2_scale: torch.Tensor,  # [local_experts, hidden]
    topk_weights: torch.Tensor,  # [tokens, top_k] float
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int,
    bits: int,  # 8 or 4 (kiln.quant.weight_only's per-channel layout)
    *,
    config: MoeConfig | None = None,
) -> torch.Tensor:  # [tokens, hidden]
    """Triton version of reference.fused_moe_weight_only (choices of experts outside this rank's range add
    nothing)."""
    _check(hidden, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, expert_start, bits)
    run = plan_moe_run(hidden, w13.shape[0], w13.shape[1] // 2, topk_ids, expert_start, config)
    if run.routing is None:
        return run.out
    _launch_gate_up(hidden.contiguous(), w13, w13_scale.contiguous(), run.act, run.routing, run.top_k, run.config,
                    bits)
    _launch_down(run.act, w2, w2_scale.contiguous(), topk_weights.contiguous(), run.part, run.routing, run.config,
                 bits)
    _launch_sum(run.part, run.out, run.ids, expert_start, w13.shape[0])
    return run.out
