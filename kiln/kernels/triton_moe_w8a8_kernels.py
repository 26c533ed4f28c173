"""Triton kernels of kiln's fused MoE over W8A8 experts: SmoothQuant INT8 and FP8 e4m3 (launcher:
triton_moe_w8a8.py). The same two grouped GEMMs as triton_moe_kernels.py (rows sorted by expert by its align kernel,
one row block x one column block per program), with both operands 8-bit: the dot runs on the 8-bit tensor cores
(INT8 -> int32 accumulator, exact; FP8 -> float32 accumulator) and the scales multiply the sums once, in the
epilogue, in the order the torch reference (kiln.kernels.reference.fused_moe_sq / fused_moe_fp8) applies them:
`acc * activation scale (per row) * weight scale (per column or per expert)`.

- gate/up: `act = silu(gate) * up` in float32, rounded to the engine dtype (as the torch path holds it). With
  QUANT_OUT (SmoothQuant with static scales) the epilogue also multiplies w2's smoother and quantizes with the
  expert's static w2 scale, so w2 reads int8 and the float intermediate never goes to memory. Per-token scales need a
  whole row's amax across the programs of a row block, so there the intermediate is stored in the engine dtype and a
  row pass (`moe_sq_row_quant_kernel` for INT8, torch for FP8) quantizes it.
- down: `y = acc * a_scale * w_scale`, rounded to the engine dtype (as the torch path's w2 output), times the routing
  weight, stored in float32 for the top-k sum.

`dtype_ptr` is any tensor in the engine dtype: only its element type is read, to round as the torch path does.
Rounding to int8 is torch.round's (the 1.5 * 2^23 trick, IEEE division), as triton_smoothquant's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_moe_kernels import _block_coords
from kiln.kernels.triton_smoothquant import QMAX, ROUND_MAGIC, _quantize_row


@triton.jit
def _w8a8_step(k, a_rows, row_ok, w_cols, n_ok, acc, size_k,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INT_DOT: tl.constexpr):
    """acc + a[rows, K tile k] @ W[K tile k, cols], both 8-bit as stored. a_rows [BLOCK_M, 1] points at the
    activation rows, w_cols [1, BLOCK_N] at the expert's weight rows (one per output column, K contiguous)."""
    offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
    if EVEN_K:
        a_mask = row_ok[:, None]
        w_mask = n_ok[None, :]
    else:
        a_mask = row_ok[:, None] & (offs_k < size_k)[None, :]
        w_mask = (offs_k < size_k)[:, None] & n_ok[None, :]
    a = tl.load(a_rows + offs_k[None, :], mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K] (0.0: fp8 takes no int)
    w = tl.load(w_cols + offs_k[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
    # One return at the end: the compiler (not the interpreter) types every return of a constexpr if/else.
    if INT_DOT:
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INT_DOT: tl.constexpr):
    """The dot's accumulator: int32 for INT8 operands (exact), float32 for FP8."""
    if INT_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def _weight_scale(s_ptr, expert, stride_se, offs_n, n_ok, PER_CHANNEL: tl.constexpr):
    """The expert's weight scale as a [1, BLOCK_N] float32 row: per channel, or the one per-tensor scale in every
    column (one shape either way: the compiler types both branches of a constexpr if alike)."""
    if PER_CHANNEL:
        offs = offs_n
    else:
        offs = offs_n * 0
    return tl.load(s_ptr + expert * stride_se + offs, mask=n_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _quantize_int8(v, scale):
    """v float32 / scale, clipped to ±127, rounded half to even: int8 as torch's quantize_activation makes it."""
    r = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -QMAX), QMAX)
    return ((r + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int8)


@triton.jit(do_not_specialize=["num_assignments", "num_m_blocks"])  # step sizes: one compile per config
def moe_w8a8_gate_up_kernel(
    x_ptr, x_scale_ptr, w13_ptr, s13_ptr, act_ptr, smoother_ptr, w2_act_ptr, dtype_ptr, sorted_ids_ptr,
    block_expert_ptr, num_assignments, top_k, ffn, hidden, num_m_blocks,
    stride_xt, stride_we, stride_wn, stride_se, stride_sm, stride_at,
    INT_DOT: tl.constexpr, PER_CHANNEL: tl.constexpr, QUANT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """act[a, n] = silu(g) * u with g = (q_x[t] . q_gate[n]) * s_x[t] * s_gate[n] (u likewise), t = a // top_k."""
    pid_m, pid_n = _block_coords(num_m_blocks, tl.cdiv(ffn, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return  # a spare block past the padded total
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = ids < num_assignments
    tokens = (ids // top_k).to(tl.int64)
    a_rows = x_ptr + tokens[:, None] * stride_xt
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < ffn
    gate_cols = w13_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    up_cols = gate_cols + ffn * stride_wn  # rows [gate; up]
    acc_gate = _zero_acc(BLOCK_M, BLOCK_N, INT_DOT)
    acc_up = _zero_acc(BLOCK_M, BLOCK_N, INT_DOT)
    steps = tl.cdiv(hidden, BLOCK_K)
    if WHILE_LOOP:
        k = 0
        while k < steps:
            acc_gate = _w8a8_step(k, a_rows, row_ok, gate_cols, n_ok, acc_gate, hidden, BLOCK_K, EVEN_K, INT_DOT)
            acc_up = _w8a8_step(k, a_rows, row_ok, up_cols, n_ok, acc_up, hidden, BLOCK_K, EVEN_K, INT_DOT)
            k += 1
    else:
        for k in range(0, steps):
            acc_gate = _w8a8_step(k, a_rows, row_ok, gate_cols, n_ok, acc_gate, hidden, BLOCK_K, EVEN_K, INT_DOT)
            acc_up = _w8a8_step(k, a_rows, row_ok, up_cols, n_ok, acc_up, hidden, BLOCK_K, EVEN_K, INT_DOT)
    x_scale = tl.load(x_scale_ptr + tokens, mask=row_ok, other=0.0)[:, None]  # [BLOCK_M, 1] float32
    gate = acc_gate.to(tl.float32) * x_scale * _weight_scale(s13_ptr, expert, stride_se, offs_n, n_ok, PER_CHANNEL)
    up = acc_up.to(tl.float32) * x_scale * _weight_scale(s13_ptr, expert, stride_se, offs_n + ffn, n_ok,
                                                         PER_CHANNEL)
    act = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype_ptr.dtype.element_ty)  # SiLU-GLU, rounded as torch holds it
    out_ptrs = act_ptr + ids[:, None].to(tl.int64) * stride_at + offs_n[None, :]
    if QUANT_OUT:
        smoother = tl.load(smoother_ptr + expert * stride_sm + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        q = _quantize_int8(act.to(tl.float32) * smoother[None, :], tl.load(w2_act_ptr + expert).to(tl.float32))
        tl.store(out_ptrs, q, mask=row_ok[:, None] & n_ok[None, :])
    else:
        tl.store(out_ptrs, act, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_sq_row_quant_kernel(act_ptr, smoother_ptr, topk_ids_ptr, q_ptr, scale_ptr, expert_start, num_experts, ffn,
                            stride_at, stride_sm, stride_q, BLOCK: tl.constexpr):
    """One assignment row of the GLU intermediate times its expert's w2 smoother, quantized per token (grid: the
    assignments; rows routed to another rank's experts were never written and are skipped)."""
    row = tl.program_id(0).to(tl.int64)
    expert = tl.load(topk_ids_ptr + row).to(tl.int64) - expert_start
    if (expert < 0) | (expert >= num_experts):
        return
    cols = tl.arange(0, BLOCK)
    mask = cols < ffn
    v = tl.load(act_ptr + row * stride_at + cols, mask=mask, other=0.0).to(tl.float32)
    v = v * tl.load(smoother_ptr + expert * stride_sm + cols, mask=mask, other=0.0).to(tl.float32)
    _quantize_row(v, mask, scale_ptr, scale_ptr, q_ptr, row, stride_q, cols, True)


@triton.jit(do_not_specialize=["num_assignments", "num_m_blocks"])  # step sizes: one compile per config
def moe_w8a8_down_kernel(
    a_ptr, a_scale_ptr, w2_ptr, s2_ptr, out_ptr, topk_weights_ptr, dtype_ptr, sorted_ids_ptr, block_expert_ptr,
    num_assignments, hidden, ffn, num_m_blocks,
    stride_at, stride_we, stride_wn, stride_se, stride_ot,
    INT_DOT: tl.constexpr, PER_CHANNEL: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """out[a, n] = topk_weight[a] * round((q_a[a] . q_down[n]) * s_a * s_down[n]) in float32; s_a is the row's own
    scale (ROW_SCALE: per token) or the expert's static one."""
    pid_m, pid_n = _block_coords(num_m_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = ids < num_assignments
    a_rows = a_ptr + ids.to(tl.int64)[:, None] * stride_at
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    w_cols = w2_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    acc = _zero_acc(BLOCK_M, BLOCK_N, INT_DOT)
    steps = tl.cdiv(ffn, BLOCK_K)
    if WHILE_LOOP:
        k = 0
        while k < steps:
            acc = _w8a8_step(k, a_rows, row_ok, w_cols, n_ok, acc, ffn, BLOCK_K, EVEN_K, INT_DOT)
            k += 1
    else:
        for k in range(0, steps):
            acc = _w8a8_step(k, a_rows, row_ok, w_cols, n_ok, acc, ffn, BLOCK_K, EVEN_K, INT_DOT)
    if ROW_SCALE:
        a_scale = tl.load(a_scale_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        a_scale = tl.load(a_scale_ptr + expert).to(tl.float32)
    y = acc.to(tl.float32) * a_scale * _weight_scale(s2_ptr, expert, stride_se, offs_n, n_ok, PER_CHANNEL)
    weight = tl.load(topk_weights_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    y = y.to(dtype_ptr.dtype.element_ty).to(tl.float32) * weight[:, None]
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, y, mask=row_ok[:, None] & n_ok[None, :])
