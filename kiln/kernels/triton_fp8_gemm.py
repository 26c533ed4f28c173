"""A Triton FP8 GEMM for prefill rows: y[M, N] = (q_x[M, K] @ q_w[N, K].T) * s_x[m] * s_w[n] (+ bias), both operands
float8_e4m3fn (x from kiln.kernels.triton_fp8_quant), a float32 accumulator, scaled once in the epilogue:
torch._scaled_mm's contract, up to summation order.

Why beside _scaled_mm: on the H100 a 2,048-token prefill of the MPT-7B shape ran as fast in FP8 through
`_scaled_mm` as in bf16 (45.5 ms both, session 9), while SmoothQuant's Triton INT8 GEMM with the same tiles got
1.57x bf16's time over the same four layers. This kernel is that INT8 kernel's tiling (128x128x128, 8 warps, 3
stages by default; one output tile per program, M fastest so that a weight tile is read once for all M tiles) on
FP8 tensor cores. Not bound by default: benchmarks/sweep_fp8_gemm.py times it against `_scaled_mm` (with and
without fast accumulation) and bf16 cuBLAS first. On the CPU interpreter the tiles are widened to float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_common import while_loops
from kiln.kernels.triton_jit_common import scale_rows_and_columns


class Fp8GemmConfig(NamedTuple):
    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3


@triton.jit
def _fp8_gemm_step(a_ptr, b_ptr, rm, rn, kk, M, N, K, stride_am, stride_bn, acc, DOT_F32: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] float32 + the fp8 tiles of columns kk."""
    a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + kk[None, :],
                mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
    b = tl.load(b_ptr + rn[None, :].to(tl.int64) * stride_bn + kk[:, None],
                mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def fp8_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, w_scale_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn,
                    stride_cm, ROW_SCALES: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    DOT_F32: tl.constexpr, WHILE_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); program (m, n) computes one output tile over all of K."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    steps = tl.cdiv(K, BLOCK_K)
    if WHILE_LOOP:  # the interpreter (triton_common.while_loops)
        i = 0
        while i < steps:
            acc = _fp8_gemm_step(a_ptr, b_ptr, rm, rn, kk + i * BLOCK_K, M, N, K, stride_am, stride_bn, acc, DOT_F32)
            i += 1
    else:
        for i in range(0, steps):
            acc = _fp8_gemm_step(a_ptr, b_ptr, rm, rn, kk + i * BLOCK_K, M, N, K, stride_am, stride_bn, acc, DOT_F32)
    acc = scale_rows_and_columns(acc, rm, rn, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, ROW_SCALES,
                                 PER_CHANNEL, HAS_BIAS)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, config: Fp8GemmConfig = Fp8GemmConfig()
             ) -> torch.Tensor:
    """xq [M, K] float8_e4m3fn (contiguous along K), x_scale float32 [1] or [M, 1], weight [N, K] float8_e4m3fn,
    w_scale [1] or [N] -> [M, N] in out_dtype."""
    m, k = xq.shape
    n = weight.shape[0]
    if weight.dtype != torch.float8_e4m3fn or xq.dtype != torch.float8_e4m3fn or weight.shape[1] != k \
            or weight.stride(1) != 1 or xq.stride(1) != 1:
        raise ValueError(f"fp8_gemm takes float8_e4m3fn x [M, {k}] and weight [N, {k}], both contiguous along K, got "
                         f"x {xq.dtype} {tuple(xq.shape)}, weight {weight.dtype} {tuple(weight.shape)}")
    if w_scale.numel() not in (1, n) or x_scale.numel() not in (1, m) or x_scale.dtype != torch.float32:
        raise ValueError(f"the weight scale must hold 1 or {n} values and the float32 x scale 1 or {m}, got "
                         f"{w_scale.numel()} and {x_scale.numel()} ({x_scale.dtype})")
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    cpu = while_loops(xq.device)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    fp8_gemm_kernel[grid](
        xq, x_scale, weight, w_scale, bias if bias is not None else w_scale, y, m, n, k, xq.stride(0),
        weight.stride(0), y.stride(0), ROW_SCALES=x_scale.numel() != 1 or m == 1,
        PER_CHANNEL=w_scale.numel() != 1 or n == 1, HAS_BIAS=bias is not None, DOT_F32=cpu, WHILE_LOOP=cpu,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return y
