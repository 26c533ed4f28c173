"""Launcher of kiln's fused MoE over group-wise INT4 (or 8-bit) experts, the W4A16_AWQ/GPTQ format (contract:
reference.fused_moe_group_wise; kernels in triton_moe_group_wise_kernels.py). The bf16 fused MoE's align and sum
launches (triton_moe.py) around two grouped GEMMs that read the stored bytes, scales and zero points and dequantize in
registers. Tiles come from the fused MoE's table (triton_moe_configs), their K tile capped at the group size so that
each lies inside one group. Nothing syncs with the host, so a group-wise MoE decode step captures in a CUDA graph."""

from __future__ import annotations

import torch

from kiln.kernels.triton_common import asm_dequant, cdiv, check_shape, check_tensor, dot_precision, dot_upcast
from kiln.kernels.triton_common import while_loops
from kiln.kernels.triton_moe import AlignedRouting, _fitting_stages, _launch_sum, plan_moe_run
from kiln.kernels.triton_moe_configs import GemmTile, MoeConfig
from kiln.kernels.triton_moe_group_wise_kernels import moe_gw_down_kernel, moe_gw_gate_up_kernel
from kiln.kernels.triton_moe_weight_only import check_quantized_experts
from kiln.quant.group_wise import num_groups

__all__ = ["fused_moe_group_wise"]


def _check_format(group_size: int, w13_k_offset: int, w2_k_offset: int, bits: int) -> None:
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two of at least 32, got {group_size}")
    for name, k_offset in (("w13_k_offset", w13_k_offset), ("w2_k_offset", w2_k_offset)):
        if not isinstance(k_offset, int) or not 0 <= k_offset < group_size or (bits == 4 and k_offset % 2):
            raise ValueError(f"{name} must be an int in [0, group_size) (even for 4 bits), got {k_offset!r}")


def _check(hidden, w13, s13, z13, w2, s2, z2, topk_weights, topk_ids, expert_start, bits, group_size,
           w13_k_offset, w2_k_offset) -> None:
    experts, two_ffn, size = check_quantized_experts(hidden, w13, w2, topk_weights, topk_ids, expert_start, bits)
    _check_format(group_size, w13_k_offset, w2_k_offset, bits)
    groups13 = num_groups(size, group_size, w13_k_offset)
    groups2 = num_groups(two_ffn // 2, group_size, w2_k_offset)
    for name, scale, zero, shape in (("w13", s13, z13, (experts, two_ffn, groups13)),
                                     ("w2", s2, z2, (experts, size, groups2))):
        for suffix, tensor in (("_scale", scale), ("_zero", zero)):
            check_tensor(name + suffix, tensor, 3, (hidden.dtype, torch.float32), hidden.device)
            check_shape(name + suffix, tensor, shape)


def _k_tile(tile: GemmTile, group_size: int) -> int:
    """The K tile: the config's (at least 32: INT4 dots need 16 bytes' worth), at most one group."""
    return min(group_size, max(32, tile.block_k))


def _launch_gate_up(hidden, w13, s13, z13, act, routing: AlignedRouting, top_k: int, config: MoeConfig, bits: int,
                    group_size: int, k_offset: int) -> None:
    ffn, size = w13.shape[1] // 2, hidden.shape[1]
    tile = config.up
    block_k = _k_tile(tile, group_size)
    num_m = routing.block_expert.numel()
    moe_gw_gate_up_kernel[(num_m * cdiv(ffn, tile.block_n),)](
        hidden, w13, s13, z13, act, routing.sorted_ids, routing.block_expert, act.shape[0], top_k, ffn, size,
        w13.shape[2], k_offset, num_m, hidden.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        act.stride(0),
        BITS=bits, GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k,
        GROUP_M=config.group_m, EVEN_K=k_offset == 0 and size % block_k == 0,
        DOT_F32=dot_upcast(hidden.dtype, hidden.device), PRECISION=dot_precision(hidden.dtype),
        ASM=asm_dequant(hidden.dtype, hidden.device),
        WHILE_LOOP=while_loops(hidden.device), num_warps=tile.num_warps,
        num_stages=_fitting_stages(tile, config.block_m, 2, hidden.dtype, hidden.device),
    )


def _launch_down(act, w2, s2, z2, weights, part, routing: AlignedRouting, config: MoeConfig, bits: int,
                 group_size: int, k_offset: int) -> None:
    size, ffn = w2.shape[1], act.shape[1]
    tile = config.down
    block_k = _k_tile(tile, group_size)
    num_m = routing.block_expert.numel()
    moe_gw_down_kernel[(num_m * cdiv(size, tile.block_n),)](
        act, w2, s2, z2, part, weights, routing.sorted_ids, routing.block_expert, act.shape[0], size, ffn,
        w2.shape[2], k_offset, num_m, act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        part.stride(0),
        BITS=bits, GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k,
        GROUP_M=config.group_m, EVEN_K=k_offset == 0 and ffn % block_k == 0,
        DOT_F32=dot_upcast(act.dtype, act.device), PRECISION=dot_precision(act.dtype),
        ASM=asm_dequant(act.dtype, act.device),
        WHILE_LOOP=while_loops(act.device), num_warps=tile.num_warps,
        num_stages=_fitting_stages(tile, config.block_m, 1, act.dtype, act.device),
    )


def fused_moe_group_wise(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden (4 bits: hidden / 2)] int8, unsigned values
    w13_scale: torch.Tensor,  # [local_experts, 2 * ffn, groups of hidden]
    w13_zero: torch.Tensor,  # like w13_scale, integer-valued
    w2: torch.Tensor,  # [local_experts, hidden, ffn (4 bits: ffn / 2)] int8
    w2_scale: torch.Tensor,  # [local_experts, hidden, groups of ffn (+1 when the ffn slice starts mid-group)]
    w2_zero: torch.Tensor,  # like w2_scale
    topk_weights: torch.Tensor,  # [tokens, top_k] float
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int,
    bits: int,  # 4 or 8
    group_size: int,
    w13_k_offset: int = 0,
    w2_k_offset: int = 0,  # where this rank's ffn slice starts inside its first group
    *,
    config: MoeConfig | None = None,
) -> torch.Tensor:  # [tokens, hidden]
    """Triton version of reference.fused_moe_group_wise (choices of experts outside this rank's range add
    nothing)."""
    _check(hidden, w13, w13_scale, w13_zero, w2, w2_scale, w2_zero, topk_weights, topk_ids, expert_start, bits,
           group_size, w13_k_offset, w2_k_offset)
    run = plan_moe_run(hidden, w13.shape[0], w13.shape[1] // 2, topk_ids, expert_start, config)
    if run.routing is None:
        return run.out
    # Scale and zero share one set of strides: both contiguous, of the same shape.
    _launch_gate_up(hidden.contiguous(), w13, w13_scale.contiguous(), w13_zero.contiguous(), run.act, run.routing,
                    run.top_k, run.config, bits, group_size, w13_k_offset)
    _launch_down(run.act, w2, w2_scale.contiguous(), w2_zero.contiguous(), topk_weights.contiguous(), run.part,
                 run.routing, run.config, bits, group_size, w2_k_offset)
    _launch_sum(run.part, run.out, run.ids, expert_start, w13.shape[0])
    return run.out
