"""Triton kernel quantizing activations to FP8 e4m3 in one pass: x [M, K] (bf16/fp16/fp32) -> q [M, K]
float8_e4m3fn and the scale that dequantizes it (kiln.quant.fp8's `activation_scale` and `cast_fp8`, bit for bit).

Why: the torch form of `cast_fp8(x, activation_scale(x, s))` is five or six kernels (amax, divide, float copy,
clamp, cast), each a pass over x in float32; at a 2048-token prefill the FFN's 2048 x 16384 input alone makes them
~0.3 ms a layer, more than FP8's GEMM saves, and at decode each is a ~2 us launch in the graph. Here one program
reads one row once: its amax (dynamic scales), the IEEE division (div_rn, as torch divides), the clamp to +-448
and the rounding to e4m3 happen in registers, and only the fp8 bytes and the row's scale are written.

The rounding to e4m3 is done in integer arithmetic on the float32 bits (round to nearest, ties to even, e4m3fn's
subnormals below 2^-6), not by Triton's fp32 -> fp8 cast: that cast is round-to-nearest-even on an H100
(cvt.rn.satfinite) but the CPU interpreter rounds ties away from zero and flushes subnormals, and CI proves
kernels under the interpreter bit for bit against torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_common import row_block

FP8_MAX: tl.constexpr = tl.constexpr(448.0)
MIN_SCALE: tl.constexpr = tl.constexpr(1e-12)  # kiln.quant.fp8.MIN_SCALE
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2^23: adding it rounds a float32 to an integer
SMALLEST_NORMAL: tl.constexpr = tl.constexpr(0.015625)  # 2^-6, e4m3's smallest normal
MAX_K = 65536  # one row per program, held in registers; wider rows stay on the torch path

# How a launch gets its scale: computed per row from the row's amax, one static value, or given per row (a
# row-parallel layer's per-token scale, already the max over the tensor-parallel ranks).
DYNAMIC, STATIC, GIVEN_PER_ROW = 0, 1, 2


@triton.jit
def e4m3_bits(v):
    """The float8_e4m3fn byte of each float32 in v (|v| <= 448), rounded to nearest, ties to even: normals keep
    the top 3 of float32's 23 mantissa bits (the 20 dropped bits rounded by an integer add that carries into the
    exponent when it must), subnormals are multiples of 2^-9 (rounded by the magic-number add). The sign comes from
    v's own bit, so -0.0 and negative values that round to zero give 0x80 as torch's cast does."""
    bits = v.to(tl.int32, bitcast=True)
    a = tl.abs(v)
    abits = a.to(tl.int32, bitcast=True)
    rounded = abits + 0x7FFFF + ((abits >> 20) & 1)
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)  # e4m3 exponent bias 7 = 127 - 120
    subnormal = ((a * 512.0 + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int32)  # 8 here is 2^-6, code 0x08: still right
    code = tl.where(a < SMALLEST_NORMAL, subnormal, normal) | ((bits >> 24) & 0x80)
    return code.to(tl.uint8)


@triton.jit
def quantize_fp8_row(v, mask, scale_ptr, out_scale_ptr, q_ptr, row, stride_q, cols, SCALE: tl.constexpr):
    """One float32 row v [BLOCK] (masked lanes 0) -> its e4m3 bytes at q[row] and, DYNAMIC, its scale at
    out_scale[row] = max(amax(|v|) / 448, 1e-12); STATIC reads scale[0], GIVEN_PER_ROW scale[row]. Also the end of
    the fused norm and activation kernels (triton_fp8_fused)."""
    if SCALE == 0:  # DYNAMIC
        amax = tl.max(tl.abs(v), axis=0)
        scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
        tl.store(out_scale_ptr + row, scale)
    elif SCALE == 1:  # STATIC
        scale = tl.load(scale_ptr).to(tl.float32)
    else:  # GIVEN_PER_ROW
        scale = tl.load(scale_ptr + row).to(tl.float32)
    r = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * stride_q + cols, e4m3_bits(r), mask=mask)


@triton.jit
def quantize_fp8_rows_kernel(x_ptr, q_ptr, scale_ptr, out_scale_ptr, K, stride_x, stride_q,
                             SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Program r: row r of x -> q[r] (bytes) and, DYNAMIC, out_scale[r]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    quantize_fp8_row(v, mask, scale_ptr, out_scale_ptr, q_ptr, row, stride_q, cols, SCALE)


def fp8_outputs(m: int, k: int, scale: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, int, torch.Tensor]:
    """What a launch quantizing m rows of k values writes and how it scales them: (q [m, k] uint8 to fill, the SCALE
    mode, the float32 scale: [m, 1] to fill (scale None: dynamic), the given one [1] (static) or [m, 1] (per row))."""
    q = torch.empty(m, k, dtype=torch.uint8, device=device)
    if scale is None:
        return q, DYNAMIC, torch.empty(m, 1, dtype=torch.float32, device=device)
    if scale.numel() == 1:
        return q, STATIC, scale.float().reshape(1)
    if scale.numel() == m:
        return q, GIVEN_PER_ROW, scale.float().reshape(m, 1)
    raise ValueError(f"the activation scale must hold 1 or {m} values (one per row), got {scale.numel()}")


def quantize_fp8_rows(x: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, scale float32: [M, 1] when computed or given per row, [1] static).
    scale None: each row's own (dynamic); one value: static; [M, 1]: given per row."""
    if x.dim() != 2 or x.shape[1] > MAX_K:
        raise ValueError(f"quantize_fp8_rows takes x [rows, K <= {MAX_K}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q, mode, out_scale = fp8_outputs(m, k, scale, x.device)
    if m:
        block, warps = row_block(k)
        quantize_fp8_rows_kernel[(m,)](x, q, out_scale, out_scale, k, x.stride(0), q.stride(0), SCALE=mode,
                                       BLOCK=block, num_warps=warps)
    return q.view(torch.float8_e4m3fn), out_scale
