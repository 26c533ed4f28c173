"""Triton kernels of kiln's fused MoE over weight-only per-channel INT8/INT4 experts (launcher:
triton_moe_weight_only.py). The same two grouped GEMMs as triton_moe_kernels.py (rows sorted by expert by its align
kernel, one row block x one column block per program), with the experts' int8 bytes loaded as stored and dequantized
in registers (triton_weight_only_kernels' exponent trick; INT4 nibbles multiply the even and odd columns of the
activations, so nothing is interleaved). The per-channel scale of each output column multiplies the fp32 sums once,
before the SiLU-GLU epilogue (gate and up have their own rows of w13_scale) and before the routing weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_jit_common import dot_acc
from kiln.kernels.triton_moe_kernels import _block_coords
from kiln.kernels.triton_dequant_asm import bytes_bf16, nibbles_bf16
from kiln.kernels.triton_weight_only_kernels import _bytes, _nibbles


@triton.jit
def _wo_step(k, a_rows, row_ok, w_cols, n_ok, acc, size_k, size_kw,
             BITS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
             PRECISION: tl.constexpr, ASM: tl.constexpr):
    """acc + a[rows, K tile k] @ dequant(W)[K tile k, cols] without the scale. a_rows [BLOCK_M, 1] points at the
    activation rows, w_cols [1, BLOCK_N] at the expert's stored weight rows (one per output column). With EVEN_K (K a
    multiple of BLOCK_K) the masks are constant along K: vector loads, pipelined by Triton."""
    offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
    if EVEN_K:
        a_mask = row_ok[:, None]
    else:
        a_mask = row_ok[:, None] & (offs_k < size_k)[None, :]
    a = tl.load(a_rows + offs_k[None, :], mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
    if BITS == 8:
        if EVEN_K:
            w_mask = n_ok[None, :]
        else:
            w_mask = (offs_k < size_k)[:, None] & n_ok[None, :]
        w = tl.load(w_cols + offs_k[:, None], mask=w_mask, other=0)  # [BLOCK_K, BLOCK_N]
        if ASM:  # bf16 on an NVIDIA GPU: the same values in fewer instructions (triton_dequant_asm)
            q = bytes_bf16(w, 0.0, True)
        else:
            q = _bytes(w, True).to(a.dtype)
        acc = dot_acc(a, q, acc, DOT_F32, PRECISION)
    else:
        offs_b = k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        if EVEN_K:
            w_mask = n_ok[None, :]
        else:
            w_mask = (offs_b < size_kw)[:, None] & n_ok[None, :]
        w = tl.load(w_cols + offs_b[:, None], mask=w_mask, other=0)  # [BLOCK_K / 2, BLOCK_N]
        if ASM:
            low, high = nibbles_bf16(w, 0.0, True)
        else:
            low, high = _nibbles(w, True)
            low, high = low.to(a.dtype), high.to(a.dtype)
        a_even, a_odd = tl.split(tl.reshape(a, [a.shape[0], BLOCK_K // 2, 2]))  # [BLOCK_M, BLOCK_K / 2] each
        acc = dot_acc(a_even, low, acc, DOT_F32, PRECISION)
        acc = dot_acc(a_odd, high, acc, DOT_F32, PRECISION)
    return acc


@triton.jit(do_not_specialize=["num_assignments", "num_m_blocks"])  # step sizes: one compile per config
def moe_wo_gate_up_kernel(
    x_ptr, w13_ptr, s13_ptr, act_ptr, sorted_ids_ptr, block_expert_ptr,
    num_assignments, top_k, ffn, hidden, hidden_w, num_m_blocks,
    stride_xt, stride_we, stride_wn, stride_se, stride_at,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    ASM: tl.constexpr,
):
    """act[a, n] = silu(s_gate[n] * x[t] . q_gate[n]) * (s_up[n] * x[t] . q_up[n]) for one sorted row block."""
    pid_m, pid_n = _block_coords(num_m_blocks, tl.cdiv(ffn, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = ids < num_assignments
    a_rows = x_ptr + (ids // top_k).to(tl.int64)[:, None] * stride_xt
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < ffn
    gate_cols = w13_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    up_cols = gate_cols + ffn * stride_wn  # rows [gate; up]
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    steps = tl.cdiv(hidden, BLOCK_K)
    if WHILE_LOOP:
        k = 0
        while k < steps:
            acc_gate = _wo_step(k, a_rows, row_ok, gate_cols, n_ok, acc_gate, hidden, hidden_w, BITS, BLOCK_K,
                                EVEN_K, DOT_F32, PRECISION, ASM)
            acc_up = _wo_step(k, a_rows, row_ok, up_cols, n_ok, acc_up, hidden, hidden_w, BITS, BLOCK_K,
                              EVEN_K, DOT_F32, PRECISION, ASM)
            k += 1
    else:
        for k in range(0, steps):
            acc_gate = _wo_step(k, a_rows, row_ok, gate_cols, n_ok, acc_gate, hidden, hidden_w, BITS, BLOCK_K,
                                EVEN_K, DOT_F32, PRECISION, ASM)
            acc_up = _wo_step(k, a_rows, row_ok, up_cols, n_ok, acc_up, hidden, hidden_w, BITS, BLOCK_K,
                              EVEN_K, DOT_F32, PRECISION, ASM)
    scales = s13_ptr + expert * stride_se + offs_n
    acc_gate = acc_gate * tl.load(scales, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc_up = acc_up * tl.load(scales + ffn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = act_ptr + ids[:, None].to(tl.int64) * stride_at + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_assignments", "num_m_blocks"])  # step sizes: one compile per config
def moe_wo_down_kernel(
    act_ptr, w2_ptr, s2_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, block_expert_ptr,
    num_assignments, hidden, ffn, ffn_w, num_m_blocks,
    stride_at, stride_we, stride_wn, stride_se, stride_ot,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    ASM: tl.constexpr,
):
    """out[a, n] = topk_weight[a] * s2[n] * (act[a] . q_down[n]) in fp32, for one sorted row block."""
    pid_m, pid_n = _block_coords(num_m_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = ids < num_assignments
    a_rows = act_ptr + ids.to(tl.int64)[:, None] * stride_at
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    w_cols = w2_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    steps = tl.cdiv(ffn, BLOCK_K)
    if WHILE_LOOP:
        k = 0
        while k < steps:
            acc = _wo_step(k, a_rows, row_ok, w_cols, n_ok, acc, ffn, ffn_w, BITS, BLOCK_K, EVEN_K, DOT_F32, PRECISION,
                           ASM)
            k += 1
    else:
        for k in range(0, steps):
            acc = _wo_step(k, a_rows, row_ok, w_cols, n_ok, acc, ffn, ffn_w, BITS, BLOCK_K, EVEN_K, DOT_F32, PRECISION,
                           ASM)
    scale = tl.load(s2_ptr + expert * stride_se + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    weight = tl.load(topk_weights_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * scale[None, :] * weight[:, None]
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])
