"""Triton kernels of kiln's fused MoE over group-wise INT4 (or 8-bit) experts, the W4A16_AWQ/GPTQ format (launcher:
triton_moe_group_wise.py; format: kiln.quant.group_wise). The same two grouped GEMMs as the per-channel weight-only
fused MoE (triton_moe_weight_only_kernels.py: rows sorted by expert, one row block x one column block per program,
bytes dequantized in registers), with UNSIGNED values and a scale and zero point per (output column, group).

K is walked in *virtual* coordinates v = k + k_offset, in tiles of BLOCK_K (a divisor of the group size G) that
start at multiples of BLOCK_K, so every tile lies inside one group: its scale and zero are one [BLOCK_N] vector each,
loaded once per tile into registers; the zero is subtracted from the integer values (exact in the activation dtype)
and the scale multiplies the tile's fp32 product. k_offset != 0 (a rank whose slice of w2's input, the expert ffn,
starts mid-group, e.g. DBRX's 1344 = 10.5 groups of 128 per rank at tp 8): the first tile starts at k = -k_offset and
its missing columns are masked.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_jit_common import dot_acc
from kiln.kernels.triton_moe_kernels import _block_coords
from kiln.kernels.triton_dequant_asm import bytes_bf16, nibbles_bf16
from kiln.kernels.triton_weight_only_kernels import _bytes, _nibbles


@triton.jit
def _gw_step(i, a_rows, row_ok, w_cols, s_cols, z_cols, n_ok, acc, k_offset, size_k, size_kw,
             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
             DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr):
    """acc + scale * (a[rows, tile i] @ (q - zero)[tile i, cols]) for virtual tile i. a_rows [BLOCK_M, 1] points at
    the activation rows, w_cols [1, BLOCK_N] at the expert's stored weight rows, s_cols / z_cols [BLOCK_N] at their
    scale and zero rows. EVEN_K: k_offset is 0 and BLOCK_K divides K (no mask along K: vector loads)."""
    v0 = i * BLOCK_K
    k0 = v0 - k_offset  # may be negative for the first tile of a slice starting mid-group (k0 even for INT4)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        a_mask = row_ok[:, None]
    else:
        a_mask = row_ok[:, None] & ((offs_k >= 0) & (offs_k < size_k))[None, :]
    a = tl.load(a_rows + offs_k[None, :], mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
    group = v0 // GROUP
    scale = tl.load(s_cols + group, mask=n_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
    zero = tl.load(z_cols + group, mask=n_ok, other=0.0).to(tl.float32)
    part = tl.zeros(acc.shape, dtype=tl.float32)
    if BITS == 8:
        if EVEN_K:
            w_mask = n_ok[None, :]
        else:
            w_mask = ((offs_k >= 0) & (offs_k < size_k))[:, None] & n_ok[None, :]
        w = tl.load(w_cols + offs_k[:, None], mask=w_mask, other=0)  # [BLOCK_K, BLOCK_N]
        if ASM:  # bf16 on an NVIDIA GPU: the same values in fewer instructions (triton_dequant_asm)
            q = bytes_bf16(w, zero[None, :], False)
        else:
            q = (_bytes(w, False) - zero[None, :]).to(a.dtype)
        part = dot_acc(a, q, part, DOT_F32, PRECISION)
    else:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        if EVEN_K:
            w_mask = n_ok[None, :]
        else:
            w_mask = ((offs_b >= 0) & (offs_b < size_kw))[:, None] & n_ok[None, :]
        w = tl.load(w_cols + offs_b[:, None], mask=w_mask, other=0)  # [BLOCK_K / 2, BLOCK_N]
        if ASM:
            low, high = nibbles_bf16(w, zero[None, :], False)
        else:
            low, high = _nibbles(w, False)
            low, high = (low - zero[None, :]).to(a.dtype), (high - zero[None, :]).to(a.dtype)
        a_even, a_odd = tl.split(tl.reshape(a, [a.shape[0], BLOCK_K // 2, 2]))  # [BLOCK_M, BLOCK_K / 2] each
        part = dot_acc(a_even, low, part, DOT_F32, PRECISION)
        part = dot_acc(a_odd, high, part, DOT_F32, PRECISION)
    return acc + part * scale[None, :]


@triton.jit(do_not_specialize=["num_assignments", "num_m_blocks"])  # step sizes: one compile per config
def moe_gw_gate_up_kernel(
    x_ptr, w13_ptr, s13_ptr, z13_ptr, act_ptr, sorted_ids_ptr, block_expert_ptr,
    num_assignments, top_k, ffn, hidden, hidden_w, k_offset, num_m_blocks,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_at,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr, ASM: tl.constexpr,
):
    """act[a, n] = silu(x[t] . dequant(gate)[n]) * (x[t] . dequant(up)[n]) for one sorted row block (w13's rows
    [gate; up]; scale and zero share the weight's row index)."""
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
    gate_groups = expert * stride_se + offs_n.to(tl.int64) * stride_sn  # [BLOCK_N] offsets into scale and zero
    up_groups = gate_groups + ffn * stride_sn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    steps = tl.cdiv(hidden + k_offset, BLOCK_K)
    if WHILE_LOOP:
        i = 0
        while i < steps:
            acc_gate = _gw_step(i, a_rows, row_ok, gate_cols, s13_ptr + gate_groups, z13_ptr + gate_groups, n_ok,
                                acc_gate, k_offset, hidden, hidden_w, BITS, GROUP, BLOCK_K, EVEN_K, DOT_F32,
                                PRECISION, ASM)
            acc_up = _gw_step(i, a_rows, row_ok, up_cols, s13_ptr + up_groups, z13_ptr + up_groups, n_ok,
                              acc_up, k_offset, hidden, hidden_w, BITS, GROUP, BLOCK_K, EVEN_K, DOT_F32,
                                PRECISION, ASM)
            i += 1
    else:
        for i in range(0, steps):
            acc_gate = _gw_step(i, a_rows, row_ok, gate_cols, s13_ptr + gate_groups, z13_ptr + gate_groups, n_ok,
                                acc_gate, k_offset, hidden, hidden_w, BITS, GROUP, BLOCK_K, EVEN_K, DOT_F32,
                                PRECISION, ASM)
            acc_up = _gw_step(i, a_rows, row_ok, up_cols, s13_ptr + up_groups, z13_ptr + up_groups, n_ok,
                              acc_up, k_offset, hidden, hidden_w, BITS, GROUP, BLOCK_K, EVEN_K, DOT_F32,
                                PRECISION, ASM)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = act_ptr + ids[:, None].to(tl.int64) * stride_at + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_assignments", "num_m_blocks"])  # step sizes: one compile per config
def moe_gw_down_kernel(
    act_ptr, w2_ptr, s2_ptr, z2_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, block_expert_ptr,
    num_assignments, hidden, ffn, ffn_w, k_offset, num_m_blocks,
    stride_at, stride_we, stride_wn, stride_se, stride_sn, stride_ot,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr, ASM: tl.constexpr,
):
    """out[a, n] = topk_weight[a] * (act[a] . dequant(down)[n]) in fp32, for one sorted row block."""
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
    groups = expert * stride_se + offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    steps = tl.cdiv(ffn + k_offset, BLOCK_K)
    if WHILE_LOOP:
        i = 0
        while i < steps:
            acc = _gw_step(i, a_rows, row_ok, w_cols, s2_ptr + groups, z2_ptr + groups, n_ok, acc, k_offset, ffn,
                           ffn_w, BITS, GROUP, BLOCK_K, EVEN_K, DOT_F32,
                                PRECISION, ASM)
            i += 1
    else:
        for i in range(0, steps):
            acc = _gw_step(i, a_rows, row_ok, w_cols, s2_ptr + groups, z2_ptr + groups, n_ok, acc, k_offset, ffn,
                           ffn_w, BITS, GROUP, BLOCK_K, EVEN_K, DOT_F32,
                                PRECISION, ASM)
    weight = tl.load(topk_weights_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])
