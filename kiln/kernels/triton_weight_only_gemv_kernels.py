"""Triton kernel of kiln's weight-only matmul for ONE row of x (decode at batch 1): y[N] = dequant(W)[N, K] @ x[K]
(launcher: triton_weight_only.py; formats as in triton_weight_only_kernels.py).

Why a second kernel: with one row, the tensor-core kernel pads x to 16 rows and moves every dequantized tile through
shared memory into the dot's layout; its sm_90 build issues about 1,100-1,300 instructions per 8 KB tile, which caps
it near half of an H100's bandwidth. Here each thread multiplies its own bytes in fp32 registers and keeps the
products apart until one reduction at the end (the weight stream of triton_gemv's `fma` form), and the integers
become floats with the magic-number trick on whole bytes:

- low nibble: (byte & 0x0F) or-ed into float32 2^23 is 2^23 + q exactly; subtracting 2^23 + bias gives q - bias.
- high nibble: (byte & 0xF0) or-ed into 2^23 is 2^23 + 16 q: the same subtraction of 2^23 + 16 bias gives 16 (q -
  bias), and x's odd elements are pre-scaled by 1/16 (exact: a power of two), so no shift is needed.

So a byte costs about seven instructions for its two values (two masks, two subtractions, two fused multiply-adds,
one byte extraction), x's conversion is shared by the BLOCK_N / (rows of threads) rows each thread holds, and the
scale multiplies once per row (per channel) or once per group tile (group-wise, where a tile never crosses a group:
see triton_weight_only_kernels for the virtual K coordinates with k_offset). Split along K as the tensor-core kernel:
fp32 partials summed in a fixed order (graph-safe), by the last program of each column block to finish
(an atomic counter per block saves the second launch) or by gemv_reduce_kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_gemv_kernels import reduce_splits_if_last
from kiln.kernels.triton_weight_only_kernels import _to_float


@triton.jit
def _tile_products(acc, w, x_ptr, k0, K, bias, BITS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc + the fp32 products of one tile, [BLOCK_N, stored bytes per row], not yet summed along K: INT8 (q - bias)
    * x[k]; INT4 (low - bias) * x[2j] + (high - bias) * x[2j + 1] for byte j. `bias` [BLOCK_N, 1] is the zero
    (group-wise) or 128 / 8 (per channel: the signed values were flipped to unsigned). For INT4, x_ptr points at x as
    int32 words, each the bf16 pair (x[2j], x[2j + 1]) that byte j multiplies: a bf16 is the top half of its float32,
    so one shift or mask makes each."""
    u = w.to(tl.int32)
    if BITS == 8:
        offs = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + offs)
        else:
            x = tl.load(x_ptr + offs, mask=(offs >= 0) & (offs < K), other=0.0)
        acc += _to_float(u & 0xFF, bias) * x.to(tl.float32)[None, :]
    else:
        offs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        if EVEN_K:
            pair = tl.load(x_ptr + offs)  # [BLOCK_K / 2] int32
        else:
            pair = tl.load(x_ptr + offs, mask=(offs >= 0) & (offs < (K + 1) // 2), other=0)
        x_even = (pair << 16).to(tl.float32, bitcast=True)
        x_odd = (pair & -65536).to(tl.float32, bitcast=True) * 0.0625  # 0xFFFF0000; 1/16: see the module doc
        acc += _to_float(u & 0x0F, bias) * x_even[None, :]
        acc += _to_float(u & 0xF0, 16.0 * bias) * x_odd[None, :]  # 16 (q - bias) * x / 16
    return acc


@triton.jit
def _load_tile(i, rows, offs_b, n_ok, s_ptr, z_ptr, offs_n, v_start, k_offset, K, KW, stride_sn,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr):
    """Tile i of the slice as it is stored: the bytes [BLOCK_N, stored bytes per tile] and (group-wise) the group's
    scale and zero [BLOCK_N] in fp32 (per channel: zeros, unused)."""
    v0 = v_start + i * BLOCK_K
    k0 = v0 - k_offset  # may be negative: the first tile of a rank whose slice starts mid-group
    start = k0 if BITS == 8 else k0 // 2
    offs = start + offs_b
    if EVEN_K:
        w = tl.load(rows + offs[None, :], mask=n_ok[:, None], other=0)
    else:
        limit = K if BITS == 8 else KW
        w = tl.load(rows + offs[None, :], mask=n_ok[:, None] & ((offs >= 0) & (offs < limit))[None, :], other=0)
    scale = tl.zeros_like(offs_n).to(tl.float32)
    zero = tl.zeros_like(offs_n).to(tl.float32)
    if GROUP != 0:
        group_ptrs = offs_n.to(tl.int64) * stride_sn + v0 // GROUP
        scale = tl.load(s_ptr + group_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + group_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    return w, scale, zero


@triton.jit
def _add_tile(i, acc, w, scale, zero, bias, x_ptr, v_start, k_offset, K, BITS: tl.constexpr, GROUP: tl.constexpr,
              HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc + tile i's products (group-wise: times the group's scale)."""
    k0 = v_start + i * BLOCK_K - k_offset
    if GROUP == 0:
        w = w ^ -128 if BITS == 8 else w ^ -120  # the bytes 0x80 / 0x88: signed -> unsigned (q + 128, nibbles + 8)
        acc = _tile_products(acc, w, x_ptr, k0, K, bias, BITS, BLOCK_K, EVEN_K)
    else:
        if HAS_ZERO:
            bias = zero[:, None]
        part = _tile_products(tl.zeros_like(acc), w, x_ptr, k0, K, bias, BITS, BLOCK_K, EVEN_K)
        acc += part * scale[:, None]
    return acc


@triton.jit
def weight_only_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    N, K, KW, k_offset, v_per_split, stride_wn, stride_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
    LAST_REDUCES: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), splits): program (n, s) computes y[n block] over the s-th slice of the virtual K
    (v_per_split long, a multiple of BLOCK_K). GROUP = 0: per channel, signed values, k_offset 0. EVEN_K: every
    tile lies whole inside [0, K) (no mask along K: the loads stay 16-byte vectors). PREFETCH: tile i + 1's loads
    are issued before tile i is multiplied (a register double buffer: Triton pipelines only loads that feed a dot,
    so without it each tile's load latency is exposed once per tile); the last iteration reloads the last tile
    (an L1/L2 hit) instead of masking. SPLIT: fp32 partials [splits, N] in part_ptr, summed by the last program of
    each column block (LAST_REDUCES, with count_ptr one int32 counter per block, all 0 on entry and on exit) or
    by gemv_reduce_kernel after."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    width: tl.constexpr = BLOCK_K if BITS == 8 else BLOCK_K // 2  # stored bytes per row per tile
    offs_b = tl.arange(0, width)
    v_start = pid_s * v_per_split
    steps = tl.cdiv(tl.minimum(K + k_offset - v_start, v_per_split), BLOCK_K)
    rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    # Per channel: the signed values flipped to unsigned (xor with the sign bit) and the flip removed as a bias.
    if GROUP == 0:
        bias = tl.full([BLOCK_N, 1], 128.0 if BITS == 8 else 8.0, tl.float32)
    else:
        bias = tl.zeros([BLOCK_N, 1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, width], dtype=tl.float32)
    if PREFETCH:
        w, scale, zero = _load_tile(0, rows, offs_b, n_ok, s_ptr, z_ptr, offs_n, v_start, k_offset, K, KW, stride_sn,
                                    BITS, GROUP, HAS_ZERO, BLOCK_K, EVEN_K)
    else:  # placeholders of the loop-carried tile, loaded by each step itself
        w = tl.zeros([BLOCK_N, width], dtype=w_ptr.dtype.element_ty)
        scale = tl.zeros([BLOCK_N], dtype=tl.float32)
        zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    if WHILE_LOOP:
        i = 0
        while i < steps:
            acc, w, scale, zero = _gemv_step(i, steps, acc, w, scale, zero, bias, rows, offs_b, n_ok, x_ptr, s_ptr,
                                             z_ptr, offs_n, v_start, k_offset, K, KW, stride_sn, BITS, GROUP,
                                             HAS_ZERO, BLOCK_K, EVEN_K, PREFETCH)
            i += 1
    else:
        for i in range(0, steps):
            acc, w, scale, zero = _gemv_step(i, steps, acc, w, scale, zero, bias, rows, offs_b, n_ok, x_ptr, s_ptr,
                                             z_ptr, offs_n, v_start, k_offset, K, KW, stride_sn, BITS, GROUP,
                                             HAS_ZERO, BLOCK_K, EVEN_K, PREFETCH)
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if GROUP == 0:
        y = y * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT:
        tl.store(part_ptr + pid_s.to(tl.int64) * N + offs_n, y, mask=n_ok)
        if LAST_REDUCES:
            reduce_splits_if_last(part_ptr, offs_n, N, y_ptr, offs_n, b_ptr, offs_n, n_ok, count_ptr + pid_n, HAS_BIAS,
                                  WHILE_LOOP)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_step(i, steps, acc, w, scale, zero, bias, rows, offs_b, n_ok, x_ptr, s_ptr, z_ptr, offs_n, v_start,
               k_offset, K, KW, stride_sn, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr):
    """One tile: (acc after tile i, the tile the next step multiplies). With PREFETCH `w, scale, zero` hold tile i
    on entry and tile i + 1 is loaded before i is multiplied; without, tile i is loaded here."""
    if PREFETCH:
        nxt = tl.minimum(i + 1, steps - 1)
        w2, s2, z2 = _load_tile(nxt, rows, offs_b, n_ok, s_ptr, z_ptr, offs_n, v_start, k_offset, K, KW, stride_sn,
                                BITS, GROUP, HAS_ZERO, BLOCK_K, EVEN_K)
    else:
        w, scale, zero = _load_tile(i, rows, offs_b, n_ok, s_ptr, z_ptr, offs_n, v_start, k_offset, K, KW, stride_sn,
                                    BITS, GROUP, HAS_ZERO, BLOCK_K, EVEN_K)
        w2, s2, z2 = w, scale, zero
    acc = _add_tile(i, acc, w, scale, zero, bias, x_ptr, v_start, k_offset, K, BITS, GROUP, HAS_ZERO, BLOCK_K, EVEN_K)
    return acc, w2, s2, z2
