"""Launchers of kiln's fused MoE over W8A8 experts (contracts: reference.fused_moe_sq and reference.fused_moe_fp8;
kernels in triton_moe_w8a8_kernels.py): SmoothQuant INT8 and FP8 e4m3, both operands 8-bit on the tensor cores.

The bf16 fused MoE's align and sum launches (triton_moe.py) around two 8-bit grouped GEMMs, with the quantization of
the activations around them:
- the MoE input is quantized once for every expert before the first GEMM: SmoothQuant by triton_smoothquant's
  smooth_quant (per token or static), FP8 by kiln.quant.fp8's torch cast (a few elementwise ops over [tokens, hidden]);
- the GLU intermediate, w2's input: SmoothQuant static scales quantize it in the first GEMM's epilogue (with w2's
  smoother); per-token scales need the whole row's amax, which no single program of the first GEMM sees, so a row pass
  quantizes it (SmoothQuant: one Triton launch with the smoother; FP8: kiln.quant.fp8's torch ops, the reference's own
  arithmetic). Every step stays on the device, so a decode step captures in a CUDA graph.

Tiles come from the fused MoE's table (triton_moe_configs, tuned at build for the bf16 kernel at the engine's
shape), with BLOCK_K at least 32 (the 8-bit dots' minimum) and pipeline stages sized for 1-byte operands.
"""

from __future__ import annotations

import torch

from kiln.kernels.triton_common import FLOAT_DTYPES, cdiv, check_shape, check_tensor, next_power_of_2, while_loops
from kiln.kernels.triton_moe import AlignedRouting, MoeRun, _fitting_stages, _launch_sum, plan_moe_run
from kiln.kernels.triton_moe_configs import MoeConfig
from kiln.kernels.triton_moe_w8a8_kernels import moe_sq_row_quant_kernel, moe_w8a8_down_kernel
from kiln.kernels.triton_moe_w8a8_kernels import moe_w8a8_gate_up_kernel
from kiln.kernels.triton_moe_weight_only import check_quantized_experts
from kiln.kernels.triton_smoothquant import smooth_quant
from kiln.kernels.triton_fp8_quant import quantize_fp8_rows
from kiln.quant.fp8 import FP8_DTYPE

__all__ = ["fused_moe_sq", "fused_moe_fp8"]


def _check_scales(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                  w2_scale: torch.Tensor, per_tensor_ok: bool) -> None:
    """Weight scales: [experts, rows] per channel, or (FP8) [experts, 1] per tensor."""
    experts, two_ffn, size = w13.shape[0], w13.shape[1], hidden.shape[1]
    for name, scale, rows in (("w13_scale", w13_scale, two_ffn), ("w2_scale", w2_scale, size)):
        check_tensor(name, scale, 2, (hidden.dtype, torch.float32), hidden.device, last_dim_contiguous=False)
        if not (per_tensor_ok and tuple(scale.shape) == (experts, 1)):
            check_shape(name, scale, (experts, rows))


def _check_sq(hidden, w13, w13_scale, w13_act, w2, w2_scale, w2_act, w2_smoother, topk_weights, topk_ids,
              expert_start) -> None:
    experts, two_ffn, _ = check_quantized_experts(hidden, w13, w2, topk_weights, topk_ids, expert_start, 8)
    _check_scales(hidden, w13, w2, w13_scale, w2_scale, per_tensor_ok=False)
    check_tensor("w2_smoother", w2_smoother, 2, (hidden.dtype,), hidden.device)
    check_shape("w2_smoother", w2_smoother, (experts, two_ffn // 2))
    if (w13_act is None) != (w2_act is None):
        raise ValueError("w13_act and w2_act are both static scales or both None (per token); got one of each")
    if w13_act is not None:
        check_tensor("w13_act", w13_act, 1, FLOAT_DTYPES, hidden.device)
        check_tensor("w2_act", w2_act, 1, FLOAT_DTYPES, hidden.device)
        check_shape("w13_act", w13_act, (1,))
        check_shape("w2_act", w2_act, (experts,))


def _check_fp8(hidden, w13, w13_scale, w2, w2_scale, input_scale, topk_weights, topk_ids, expert_start) -> None:
    for name, weight in (("w13", w13), ("w2", w2)):
        check_tensor(name, weight, 3, (FP8_DTYPE,), hidden.device)
    check_quantized_experts(hidden, w13.view(torch.int8), w2.view(torch.int8), topk_weights, topk_ids,
                            expert_start, 8)
    _check_scales(hidden, w13, w2, w13_scale, w2_scale, per_tensor_ok=True)
    if input_scale is not None:
        check_tensor("input_scale", input_scale, 1, FLOAT_DTYPES, hidden.device)
        check_shape("input_scale", input_scale, (1,))


def _launch_gate_up(x, x_scale, w13, s13, act, routing: AlignedRouting, run: MoeRun, dtype_ref: torch.Tensor,
                    smoother: torch.Tensor | None = None, w2_act: torch.Tensor | None = None) -> None:
    """x [tokens, hidden] 8-bit, x_scale [tokens] float32 -> act [assignments, ffn]: the engine dtype, or int8
    quantized with the smoother and static w2 scale (both given)."""
    ffn, size = w13.shape[1] // 2, x.shape[1]
    config: MoeConfig = run.config
    tile = config.up
    block_k = max(32, tile.block_k)
    num_m = routing.block_expert.numel()
    moe_w8a8_gate_up_kernel[(num_m * cdiv(ffn, tile.block_n),)](
        x, x_scale, w13, s13, act, smoother if smoother is not None else s13, w2_act if w2_act is not None else s13,
        dtype_ref, routing.sorted_ids, routing.block_expert, act.shape[0], run.top_k, ffn, size, num_m,
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), 0 if smoother is None else smoother.stride(0),
        act.stride(0), INT_DOT=w13.dtype == torch.int8, PER_CHANNEL=s13.shape[1] != 1, QUANT_OUT=w2_act is not None,
        BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, GROUP_M=config.group_m,
        EVEN_K=size % block_k == 0, WHILE_LOOP=while_loops(x.device), num_warps=tile.num_warps,
        num_stages=_fitting_stages(tile, config.block_m, 2, torch.int8, x.device),
    )


def _launch_down(qa, a_scale, w2, s2, weights, routing: AlignedRouting, run: MoeRun, dtype_ref: torch.Tensor,
                 row_scale: bool) -> None:
    """qa [assignments, ffn] 8-bit with a_scale ([assignments] per row, or [experts] static) -> run.part."""
    size, ffn = w2.shape[1], qa.shape[1]
    config: MoeConfig = run.config
    tile = config.down
    block_k = max(32, tile.block_k)
    num_m = routing.block_expert.numel()
    moe_w8a8_down_kernel[(num_m * cdiv(size, tile.block_n),)](
        qa, a_scale, w2, s2, run.part, weights, dtype_ref, routing.sorted_ids, routing.block_expert, qa.shape[0],
        size, ffn, num_m, qa.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), run.part.stride(0),
        INT_DOT=w2.dtype == torch.int8, PER_CHANNEL=s2.shape[1] != 1, ROW_SCALE=row_scale,
        BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, GROUP_M=config.group_m,
        EVEN_K=ffn % block_k == 0, WHILE_LOOP=while_loops(qa.device), num_warps=tile.num_warps,
        num_stages=_fitting_stages(tile, config.block_m, 1, torch.int8, qa.device),
    )


def _sq_row_quant(act: torch.Tensor, smoother: torch.Tensor, ids: torch.Tensor,
                  expert_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """act [assignments, ffn] (engine dtype) times its expert's smoother, quantized per row -> (int8, [A] float32)."""
    assignments, ffn = act.shape
    q = torch.empty(assignments, ffn, dtype=torch.int8, device=act.device)
    scale = torch.empty(assignments, dtype=torch.float32, device=act.device)
    block = max(next_power_of_2(ffn), 16)
    moe_sq_row_quant_kernel[(assignments,)](
        act, smoother, ids, q, scale, expert_start, smoother.shape[0], ffn, act.stride(0), smoother.stride(0),
        q.stride(0), BLOCK=block, num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    return q, scale


def fused_moe_sq(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden] int8, rows [gate; up]
    w13_scale: torch.Tensor,  # [local_experts, 2 * ffn]
    w13_act: torch.Tensor | None,  # [1] static input scale; None: per token
    w2: torch.Tensor,  # [local_experts, hidden, ffn] int8
    w2_scale: torch.Tensor,  # [local_experts, hidden]
    w2_act: torch.Tensor | None,  # [local_experts] static scales of w2's input; None: per token
    w2_smoother: torch.Tensor,  # [local_experts, ffn]
    topk_weights: torch.Tensor,  # [tokens, top_k] float
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int,
    *,
    config: MoeConfig | None = None,
) -> torch.Tensor:  # [tokens, hidden]
    """Triton version of reference.fused_moe_sq (choices of experts outside this rank's range add nothing)."""
    _check_sq(hidden, w13, w13_scale, w13_act, w2, w2_scale, w2_act, w2_smoother, topk_weights, topk_ids,
              expert_start)
    static = w2_act is not None
    run = plan_moe_run(hidden, w13.shape[0], w13.shape[1] // 2, topk_ids, expert_start, config,
                       torch.int8 if static else None)
    if run.routing is None:
        return run.out
    qx, x_scale = smooth_quant(hidden, None, w13_act)  # [tokens, hidden] int8, [tokens, 1] float32
    s13, s2 = w13_scale.contiguous(), w2_scale.contiguous()
    if static:
        _launch_gate_up(qx, x_scale, w13, s13, run.act, run.routing, run, hidden, w2_smoother, w2_act)
        qa, a_scale = run.act, w2_act
    else:
        _launch_gate_up(qx, x_scale, w13, s13, run.act, run.routing, run, hidden)
        qa, a_scale = _sq_row_quant(run.act, w2_smoother, run.ids, expert_start)
    _launch_down(qa, a_scale, w2, s2, topk_weights.contiguous(), run.routing, run, hidden, row_scale=not static)
    _launch_sum(run.part, run.out, run.ids, expert_start, w13.shape[0])
    return run.out


def fused_moe_fp8(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden] float8_e4m3fn
    w13_scale: torch.Tensor,  # [local_experts, 1 or 2 * ffn]
    w2: torch.Tensor,  # [local_experts, hidden, ffn] float8_e4m3fn
    w2_scale: torch.Tensor,  # [local_experts, 1 or hidden]
    input_scale: torch.Tensor | None,  # [1] static input scale; None: per token
    topk_weights: torch.Tensor,  # [tokens, top_k] float
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int,
    *,
    config: MoeConfig | None = None,
) -> torch.Tensor:  # [tokens, hidden]
    """Triton version of reference.fused_moe_fp8, for GPUs with FP8 tensor cores (sm_89+) and the interpreter."""
    _check_fp8(hidden, w13, w13_scale, w2, w2_scale, input_scale, topk_weights, topk_ids, expert_start)
    run = plan_moe_run(hidden, w13.shape[0], w13.shape[1] // 2, topk_ids, expert_start, config)
    if run.routing is None:
        return run.out
    # one Triton pass each (triton_fp8_quant: the torch quantization's bits, without its five elementwise launches)
    qx, x_scale = quantize_fp8_rows(hidden, input_scale)  # [tokens, hidden] fp8, [1] or [tokens, 1] float32
    x_scale = x_scale.reshape(-1).expand(hidden.shape[0]).contiguous()
    _launch_gate_up(qx, x_scale, w13, w13_scale.contiguous(), run.act, run.routing, run, hidden)
    qa, a_scale = quantize_fp8_rows(run.act, None)  # [assignments, 1]: per token, as the reference
    _launch_down(qa, a_scale.reshape(-1), w2, w2_scale.contiguous(), topk_weights.contiguous(), run.routing, run,
                 hidden, row_scale=True)
    _launch_sum(run.part, run.out, run.ids, expert_start, w13.shape[0])
    return run.out
