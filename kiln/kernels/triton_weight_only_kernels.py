"""Triton kernels of kiln's weight-only INT8/INT4 matmul y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias) (launcher:
triton_weight_only.py). Two storage formats, dequantized in registers:

- per channel (kiln.quant.weight_only): signed int8, or two SIGNED nibbles per byte along K (element 2i low), one
  scale per output row: w = q * s[n]. The scale multiplies the fp32 sum once at the end.
- group-wise (the W4A16_AWQ/GPTQ format, prompts/gw_format.md): UNSIGNED nibbles (or uint8 bits viewed as int8),
  scale and zero per (row, group): w = (q - z[n, g]) * s[n, g], g = (k + k_offset) // G. The kernel walks K in
  *virtual* coordinates v = k + k_offset with tiles of BLOCK_K = G (or a divisor of it) starting at multiples of
  BLOCK_K, so each tile lies inside one group: its scale and zero are one [BLOCK_N] vector, loaded once per tile,
  and the scale multiplies the tile's fp32 dot product rather than every weight. The first tile of a rank whose
  slice starts mid-group begins at k = -k_offset; its missing columns are masked.

Each program owns BLOCK_N output rows and BLOCK_M rows of x and loads every weight tile once for all of them: the
tile is multiplied on the tensor cores as y^T = W @ x^T (rows of x past M masked to zero; tl.dot needs 16 on every
side). INT4 bytes are split into their low and high nibbles, which multiply the even and odd elements of x: nothing
is interleaved. Integers become floats by the exponent trick (or-ing q into the mantissa of 2^23 and subtracting),
full-rate ALU work, not the quarter-rate int-to-float conversion. With SPLIT, program (n, s, m) covers the s-th
slice of K and writes its fp32 partial to part[s]; the last program of each output block to finish sums the slices
in a fixed order (triton_gemv_kernels.reduce_splits_if_last: no second launch), or gemv_reduce_kernel does after:
graph-safe, the same bits every run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_dequant_asm import bytes_bf16, nibbles_bf16
from kiln.kernels.triton_gemv_kernels import reduce_splits_if_last
from kiln.kernels.triton_jit_common import dot_acc

# The bits of 2^23 as float32: or-ing u < 2^23 into its mantissa gives 2^23 + u exactly. A constexpr: compiled
# Triton reads no other kind of global.
_MAGIC = tl.constexpr(0x4B000000)


@triton.jit
def _to_float(u, bias):
    """u (int32, 0 <= u < 2^23) -> float32 u - bias, exactly (bias <= 2^8)."""
    return (u | _MAGIC).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _nibbles(w, SIGNED: tl.constexpr):
    """Bytes [.., KB] int8 -> (low, high) float32 values: signed -8..7, or unsigned 0..15."""
    u = w.to(tl.int32)
    low, high = u & 0xF, (u >> 4) & 0xF
    if SIGNED:  # two's complement nibble t: t ^ 8 is t + 8 in 0..15
        return _to_float(low ^ 8, 8.0), _to_float(high ^ 8, 8.0)
    return _to_float(low, 0.0), _to_float(high, 0.0)


@triton.jit
def _bytes(w, SIGNED: tl.constexpr):
    """int8 bytes -> float32 values: signed -128..127, or the uint8 they hold (0..255)."""
    u = w.to(tl.int32) & 0xFF
    if SIGNED:
        return _to_float(u ^ 0x80, 128.0)
    return _to_float(u, 0.0)


@triton.jit
def _load_w(w_ptr, offs_n, n_ok, k0, K, KW, stride_wn, valid, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
            EVEN_K: tl.constexpr):
    """The stored bytes of W[n block, k0 : k0 + BLOCK_K] ([BLOCK_N, BLOCK_K] int8, INT4 [BLOCK_N, BLOCK_K / 2]);
    zeros where masked or not `valid`. k0 may be negative (the first tile of a slice starting mid-group). With
    EVEN_K every tile lies inside [0, K): the mask is constant along K, so the
    loads stay 16-byte vectors."""
    width: tl.constexpr = BLOCK_K if BITS == 8 else BLOCK_K // 2
    start = k0 if BITS == 8 else k0 // 2  # k0 is even for INT4: whole bytes
    offs = start + tl.arange(0, width)
    if EVEN_K:
        mask = n_ok[:, None] & valid
    else:
        limit = K if BITS == 8 else KW
        mask = n_ok[:, None] & ((offs >= 0) & (offs < limit) & valid)[None, :]
    return tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs[None, :], mask=mask, other=0)


@triton.jit
def _load_x(x_ptr, offs_m, m_ok, k0, K, stride_xm, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """x[m block, k0 : k0 + BLOCK_K] as [BLOCK_M, BLOCK_K] (contiguous along K: vector loads), zeros where masked."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        mask = m_ok[:, None]
    else:
        mask = m_ok[:, None] & ((offs_k >= 0) & (offs_k < K))[None, :]
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _tile_dot(w, x_ptr, offs_m, m_ok, k0, K, stride_xm, zero,
              BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
              ASM: tl.constexpr, acc):
    """acc + W_tile @ x[m block, k0 : k0 + BLOCK_K]^T, the tile's stored bytes `w` dequantized without their scale
    (minus `zero` [BLOCK_N] when HAS_ZERO). For INT4, x's even and odd columns are split in registers. ASM (bf16 x on
    an NVIDIA GPU): the bytes become bf16 pairs in PTX (triton_dequant_asm), the same values in fewer instructions."""
    dtype = x_ptr.dtype.element_ty
    x = _load_x(x_ptr, offs_m, m_ok, k0, K, stride_xm, BLOCK_K, EVEN_K)  # [BLOCK_M, BLOCK_K]
    if BITS == 8:
        if ASM:
            q = bytes_bf16(w, zero[:, None], SIGNED)
        else:
            q = _bytes(w, SIGNED)
            if HAS_ZERO:
                q = q - zero[:, None]
            q = q.to(dtype)
        acc = dot_acc(q, tl.trans(x), acc, DOT_F32, PRECISION)
    else:
        if ASM:
            low, high = nibbles_bf16(w, zero[:, None], SIGNED)
        else:
            low, high = _nibbles(w, SIGNED)
            if HAS_ZERO:
                low = low - zero[:, None]
                high = high - zero[:, None]
            low, high = low.to(dtype), high.to(dtype)
        x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 2, 2]))  # [BLOCK_M, BLOCK_K / 2] each
        acc = dot_acc(low, tl.trans(x_even), acc, DOT_F32, PRECISION)
        acc = dot_acc(high, tl.trans(x_odd), acc, DOT_F32, PRECISION)
    return acc


@triton.jit
def _step(i, w, x_ptr, s_ptr, z_ptr, offs_n, n_ok, offs_m, m_ok, v_start, k_offset, K,
          stride_xm, stride_sn, acc,
          BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
          PRECISION: tl.constexpr, ASM: tl.constexpr):
    """Tile i of a program's slice (its bytes `w` already loaded): per channel, accumulate the unscaled product;
    group-wise, the tile's product times its group's scale."""
    v0 = v_start + i * BLOCK_K
    k0 = v0 - k_offset
    if GROUP == 0:
        zero = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc = _tile_dot(w, x_ptr, offs_m, m_ok, k0, K, stride_xm, zero,
                        BITS, True, False, BLOCK_K, BLOCK_M, EVEN_K, DOT_F32, PRECISION, ASM, acc)
    else:
        group_ptrs = offs_n.to(tl.int64) * stride_sn + v0 // GROUP
        scale = tl.load(s_ptr + group_ptrs, mask=n_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
        if HAS_ZERO:
            zero = tl.load(z_ptr + group_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        else:
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
        part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        part = _tile_dot(w, x_ptr, offs_m, m_ok, k0, K, stride_xm, zero,
                         BITS, False, HAS_ZERO, BLOCK_K, BLOCK_M, EVEN_K, DOT_F32, PRECISION, ASM, part)
        acc += part * scale[:, None]
    return acc


@triton.jit
def weight_only_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, KW, k_offset, v_per_split, stride_xm, stride_wn, stride_sn, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, LAST_REDUCES: tl.constexpr, WHILE_LOOP: tl.constexpr,
    ASM: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), splits, cdiv(M, BLOCK_M)). GROUP = 0: per channel (k_offset 0). The virtual length
    K + k_offset is cut into slices of v_per_split (a multiple of BLOCK_K), one per split. EVEN_K: k_offset is 0
    and BLOCK_K divides K (every tile whole; no mask along K). SPLIT: fp32 partials [splits, M, N] in part_ptr,
    summed by the last program of each output block (LAST_REDUCES: count_ptr holds one int32 counter per (m, n)
    block, 0 on entry and exit) or by gemv_reduce_kernel after.

    Triton's pipeliner keeps num_stages tiles of W and x in flight (asynchronous copies to shared memory) when their
    masks are constant along K (EVEN_K) and the pointers' alignment is known (sizes and strides divisible by 16, as
    real layers' are); the dequantization then reads the tile from shared memory."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    v_start = pid_s * v_per_split
    span = tl.minimum(K + k_offset - v_start, v_per_split)
    steps = tl.cdiv(span, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y^T of this block
    k_first = v_start - k_offset
    if WHILE_LOOP:
        i = 0
        while i < steps:
            w = _load_w(w_ptr, offs_n, n_ok, k_first + i * BLOCK_K, K, KW, stride_wn, True, BITS, BLOCK_K, EVEN_K)
            acc = _step(i, w, x_ptr, s_ptr, z_ptr, offs_n, n_ok, offs_m, m_ok, v_start, k_offset, K,
                        stride_xm, stride_sn, acc, BITS, GROUP, HAS_ZERO, BLOCK_K, BLOCK_M, BLOCK_N, EVEN_K,
                        DOT_F32, PRECISION, ASM)
            i += 1
    else:
        for i in range(0, steps):
            w = _load_w(w_ptr, offs_n, n_ok, k_first + i * BLOCK_K, K, KW, stride_wn, True, BITS, BLOCK_K, EVEN_K)
            acc = _step(i, w, x_ptr, s_ptr, z_ptr, offs_n, n_ok, offs_m, m_ok, v_start, k_offset, K,
                        stride_xm, stride_sn, acc, BITS, GROUP, HAS_ZERO, BLOCK_K, BLOCK_M, BLOCK_N, EVEN_K,
                        DOT_F32, PRECISION, ASM)
    if GROUP == 0:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT:
        part_offs = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
        tl.store(part_ptr + pid_s.to(tl.int64) * M * N + part_offs, acc, mask=mask)
        if LAST_REDUCES:
            y_offs = offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
            reduce_splits_if_last(part_ptr, part_offs, M * N, y_ptr, y_offs, b_ptr, offs_n[:, None], mask,
                                  count_ptr + pid_m * tl.num_programs(0) + pid_n, HAS_BIAS, WHILE_LOOP)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, k_offset, stride_wn, stride_sn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """out[N, K] = dequant(W) in out's dtype, one pass (the prefill path hands it to cuBLAS). Grid (cdiv(N,
    BLOCK_N), cdiv(KW, BLOCK_B)): each program reads a [BLOCK_N, BLOCK_B] tile of stored bytes. INT4's low and high
    values are interleaved in registers (tl.join), so the output row is written contiguously."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    n_ok = offs_n < N
    mask = n_ok[:, None] & (offs_b < KW)[None, :]
    rows = offs_n[:, None].to(tl.int64)
    w = tl.load(w_ptr + rows * stride_wn + offs_b[None, :], mask=mask, other=0)
    signed = GROUP == 0
    if BITS == 8:
        out = _dequant_values(_bytes(w, signed), offs_b, offs_n, n_ok, mask, s_ptr, z_ptr, k_offset, stride_sn,
                              GROUP, HAS_ZERO)
        tl.store(out_ptr + rows * stride_on + offs_b[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        low, high = _nibbles(w, signed)
        low = _dequant_values(low, 2 * offs_b, offs_n, n_ok, mask, s_ptr, z_ptr, k_offset, stride_sn, GROUP,
                              HAS_ZERO)
        high = _dequant_values(high, 2 * offs_b + 1, offs_n, n_ok, mask, s_ptr, z_ptr, k_offset, stride_sn, GROUP,
                               HAS_ZERO)
        out = tl.reshape(tl.join(low, high), [BLOCK_N, 2 * BLOCK_B])  # element 2j low, 2j + 1 high
        offs_k = 2 * tl.program_id(1) * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
        out_mask = n_ok[:, None] & (offs_k < K)[None, :]
        tl.store(out_ptr + rows * stride_on + offs_k[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def dequantize_groups_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, k_offset, stride_wn, stride_sn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Group-wise weights (GROUP a power of two): out[N, K] = dequant(W), one group of a BLOCK_N-row block per
    program, so that each row's scale and zero are loaded once, not once per element as dequantize_kernel's gather
    does. Grid (cdiv(N, BLOCK_N), groups): group g covers k = g * GROUP - k_offset + 0..GROUP-1 (k < 0 masked, the
    first group of a rank whose slice starts mid-group)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    n_ok = offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    at = offs_n.to(tl.int64) * stride_sn + group
    scale = tl.load(s_ptr + at, mask=n_ok, other=0.0)[:, None]  # [BLOCK_N, 1] in the scale's dtype
    zero = tl.load(z_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[:, None] if HAS_ZERO else 0.0
    offs_k = group * GROUP - k_offset + tl.arange(0, GROUP)
    out_mask = n_ok[:, None] & ((offs_k >= 0) & (offs_k < K))[None, :]
    if BITS == 8:
        w = tl.load(w_ptr + rows * stride_wn + offs_k[None, :], mask=out_mask, other=0)
        out = _group_values(_bytes(w, False), scale, zero)
    else:
        offs_b = (group * GROUP - k_offset) // 2 + tl.arange(0, GROUP // 2)  # k_offset is even for 4 bits
        mask = n_ok[:, None] & ((offs_b >= 0) & (offs_b < KW))[None, :]
        low, high = _nibbles(tl.load(w_ptr + rows * stride_wn + offs_b[None, :], mask=mask, other=0), False)
        out = tl.reshape(tl.join(_group_values(low, scale, zero), _group_values(high, scale, zero)),
                         [BLOCK_N, GROUP])  # element 2j low, 2j + 1 high
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _group_values(q, scale, zero):
    """(q - zero) rounded to the scale's dtype, times the scale (as the torch dequantize and _dequant_values)."""
    return (q - zero).to(scale.dtype).to(tl.float32) * scale.to(tl.float32)


@triton.jit
def _dequant_values(q, offs_k, offs_n, n_ok, mask, s_ptr, z_ptr, k_offset, stride_sn,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Float q [BLOCK_N, B] at columns offs_k -> its weights: q * s[n] per channel, (q - z) * s group-wise (the
    difference rounded to the scale's dtype first, as the torch dequantize does)."""
    if GROUP == 0:
        scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)  # one scale per row
        return q * scale.to(tl.float32)[:, None]
    ptrs = offs_n[:, None].to(tl.int64) * stride_sn + ((offs_k + k_offset) // GROUP)[None, :]
    scale = tl.load(s_ptr + ptrs, mask=mask, other=0.0)
    if HAS_ZERO:
        q = q - tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    return q.to(scale.dtype).to(tl.float32) * scale.to(tl.float32)
