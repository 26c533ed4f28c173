"""A Triton GEMV for FP8 weights at decode row counts: y[M, N] = xq[M, K] @ (q_w[N, K] * s_w).T (+ bias), the
float8_e4m3fn weight streamed in its stored byte and dequantized in registers (batch-1 decode reads every weight
once a step, so bytes are the time), the activation already fake-quantized in its own dtype (kiln.quant.fp8), so
the result is the torch reference's up to summation order.

Each program owns BLOCK_N output rows and all M (<= BLOCK_M = 16) rows of x; it walks K in BLOCK_K tiles, each
weight tile loaded once and converted to the activation dtype (exact for e4m3 in bf16/fp16/fp32), multiplied on the
tensor cores as a [16, BLOCK_K] @ [BLOCK_K, BLOCK_N] dot with an fp32 accumulator; the weight scale ([1] or [N])
multiplies the fp32 sum once at the end. Not bound by default (kiln.quant.fp8_layers: KILN_FP8_GEMV=1), until a GPU
measures it against torch._scaled_mm (tests/test_quant_fp8_gpu.py prints both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_jit_common import dot_acc

BLOCK_M = 16  # tl.dot needs 16 on every side; rows of x past M are masked to zero
MAX_ROWS = 16


@triton.jit
def fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_ym,
                    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a constexpr: a model has a few distinct K, each compiled once
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K] fp8
        acc = dot_acc(x, tl.trans(w.to(x.dtype)), acc, DOT_F32, PRECISION)
    if PER_CHANNEL:
        scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        scale = tl.load(s_ptr).to(tl.float32)
    acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemv(xq: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
             block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    """xq [M <= 16, K] (already fake-quantized, contiguous along K), weight [N, K] float8_e4m3fn, scale [1] or [N]
    -> [M, N] in xq's dtype."""
    m, k = xq.shape
    n = weight.shape[0]
    if weight.dtype != torch.float8_e4m3fn or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"fp8_gemv takes a float8_e4m3fn weight [N, {k}] contiguous along K, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if m > MAX_ROWS or xq.stride(1) != 1:
        raise ValueError(f"fp8_gemv takes at most {MAX_ROWS} rows contiguous along K, got {tuple(xq.shape)}")
    if scale.numel() not in (1, n):
        raise ValueError(f"the weight scale must hold 1 or {n} values, got {scale.numel()}")
    y = torch.empty(m, n, dtype=xq.dtype, device=xq.device)
    fp32 = xq.dtype == torch.float32
    fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        xq, weight, scale, bias if bias is not None else scale, y, m, n, k, xq.stride(0), weight.stride(0),
        y.stride(0), PER_CHANNEL=scale.numel() != 1 or n == 1, HAS_BIAS=bias is not None, DOT_F32=fp32,
        PRECISION="ieee" if fp32 else "tf32", BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
