"""A Triton GEMV for FP8 W8A8 at decode row counts: y[M, N] = (q_x[M, K] @ q_w[N, K].T) * s_x[m] * s_w[n] (+ bias),
both operands float8_e4m3fn (x quantized by kiln.kernels.triton_fp8_quant), the products summed in float32 and
scaled once at the end: torch._scaled_mm's contract, up to summation order.

Why beside _scaled_mm: a decode step of batch 1-16 reads every weight once and multiplies little, so bytes are the
time; cuBLAS's FP8 GEMM is built for large M. Each program owns BLOCK_N output rows and all M (<= BLOCK_M = 16)
rows of x; it walks K in BLOCK_K tiles, each weight tile loaded once in its stored byte, widened to float16 (exact
for every e4m3 value; float32 on the CPU interpreter) and multiplied on the tensor cores as a [16, BLOCK_K] @
[BLOCK_K, BLOCK_N] dot with a float32 accumulator. kiln.quant.fp8_layers binds it for decode rows (KILN_FP8_GEMV=0
turns it off) where a GPU measured it faster (docs/performance.md, benchmarks/sweep_fp8_gemv.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_jit_common import dot_acc, scale_rows_and_columns

BLOCK_M = 16  # tl.dot needs 16 on every side; rows of x past M are masked to zero
MAX_ROWS = 16


class Fp8GemvConfig(NamedTuple):
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def fp8_gemv_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn,
                    stride_ym, ROW_SCALES: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a constexpr: a model has a few distinct K, each compiled once
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K] fp8
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K] fp8
        # float16 holds every e4m3 value exactly and sm_90 widens e4m3 pairs to it in one instruction (to bfloat16
        # it takes three: the sm_90 PTX of this loop had 341 conversions with bf16 tiles, 149 with f16)
        acc = dot_acc(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc, DOT_F32, PRECISION)
    acc = scale_rows_and_columns(acc, offs_m, offs_n, M, N, xs_ptr, s_ptr, b_ptr, ROW_SCALES,
                                 PER_CHANNEL, HAS_BIAS)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemv(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, config: Fp8GemvConfig = Fp8GemvConfig()
             ) -> torch.Tensor:
    """xq [M <= 16, K] float8_e4m3fn (contiguous along K), x_scale float32 [1] or [M, 1], weight [N, K]
    float8_e4m3fn, w_scale [1] or [N] -> [M, N] in out_dtype."""
    m, k = xq.shape
    n = weight.shape[0]
    if weight.dtype != torch.float8_e4m3fn or xq.dtype != torch.float8_e4m3fn or weight.shape[1] != k \
            or weight.stride(1) != 1:
        raise ValueError(f"fp8_gemv takes float8_e4m3fn x and weight [N, {k}] contiguous along K, got x {xq.dtype}, "
                         f"weight {weight.dtype} {tuple(weight.shape)}")
    if m > MAX_ROWS or xq.stride(1) != 1:
        raise ValueError(f"fp8_gemv takes at most {MAX_ROWS} rows contiguous along K, got {tuple(xq.shape)}")
    if w_scale.numel() not in (1, n) or x_scale.numel() not in (1, m) or x_scale.dtype != torch.float32:
        raise ValueError(f"the weight scale must hold 1 or {n} values and the float32 x scale 1 or {m}, got "
                         f"{w_scale.numel()} and {x_scale.numel()} ({x_scale.dtype})")
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    fp32 = out_dtype == torch.float32
    fp8_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        xq, x_scale, weight, w_scale, bias if bias is not None else w_scale, y, m, n, k, xq.stride(0),
        weight.stride(0), y.stride(0), ROW_SCALES=x_scale.numel() != 1 or m == 1,
        PER_CHANNEL=w_scale.numel() != 1 or n == 1, HAS_BIAS=bias is not None, DOT_F32=fp32,
        PRECISION="ieee" if fp32 else "tf32", BLOCK_M=BLOCK_M, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return y
