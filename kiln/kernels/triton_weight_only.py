"""Triton weight-only GEMV for decode rows: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), W stored as kiln's
weight-only per-channel INT8 or INT4 (kiln.quant.weight_only: int8 [N, K], or two 4-bit values per byte along K, low
nibble first, [N, K / 2]) with one scale per output row.

The weight is streamed once in its stored bytes and dequantized in registers: each program owns BLOCK_N rows of W and
one row of x, walks K in BLOCK_K stored bytes, and accumulates q * x in fp32; the row scale multiplies the sum once at
the end (sum_k q * s * x = s * sum_k q * x). For INT4 the low and high nibbles of byte j multiply x[2j] and x[2j + 1],
so x is read as its even and odd elements and nothing is interleaved.

First slice: tested against the torch reference through Triton's interpreter (tests/test_quant_weight_only_triton.py);
not yet chosen by any engine (that needs timing on a GPU against dequantize-then-cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_K = 32, 64


@triton.jit
def weight_only_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    N, KW, stride_xm, stride_wn, stride_ym,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), M): program (n, m) computes y[m, n block]. KW is the stored width (K or K / 2)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # A while loop: Triton's interpreter cannot take a runtime scalar as a range bound here (numpy refuses
    # int() of its one-element array); compiled, the loop is the same.
    k0 = 0
    while k0 < KW:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KW
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_N, BLOCK_K] int8
        if BITS == 8:
            x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        else:
            low = (w << 4).to(tl.int8) >> 4  # arithmetic shifts sign-extend the low nibble
            high = w >> 4
            x_even = tl.load(x_row + 2 * offs_k, mask=k_ok, other=0.0).to(tl.float32)
            x_odd = tl.load(x_row + 2 * offs_k + 1, mask=k_ok, other=0.0).to(tl.float32)
            acc += low.to(tl.float32) * x_even[None, :] + high.to(tl.float32) * x_odd[None, :]
        k0 += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int) -> None:
    """Refuse inputs the kernel would misread, saying what was wrong."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if x.dim() != 2 or weight.dim() != 2 or weight.dtype != torch.int8:
        raise ValueError(f"expected x [M, K] and an int8 weight [N, K or K / 2]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}")
    width = weight.shape[1] * (2 if bits == 4 else 1)
    if x.shape[1] != width:
        raise ValueError(f"x has {x.shape[1]} input features, the {bits}-bit weight holds {width}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and the weight must be contiguous along K (call .contiguous())")
    if tuple(scale.shape) != (weight.shape[0],) or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"scale and bias must be [N] = [{weight.shape[0]}]; got {tuple(scale.shape)}"
                         f"{'' if bias is None else ', ' + str(tuple(bias.shape))}")
    devices = {t.device for t in (x, weight, scale) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"x, weight, scale and bias must be on one device; got {sorted(map(str, devices))}")


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       bits: int) -> torch.Tensor:  # x [M, K], weight [N, K or K / 2] int8, scale [N] -> [M, N]
    """y = x @ dequant(weight, scale).T + bias, in x's dtype (fp32 accumulation)."""
    _check(x, weight, scale, bias, bits)
    n, m = weight.shape[0], x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    scale = scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else scale  # unread without HAS_BIAS
    grid = (triton.cdiv(n, BLOCK_N), m)
    weight_only_gemv_kernel[grid](x, weight, scale, bias_arg, y, n, weight.shape[1], x.stride(0), weight.stride(0),
                                  y.stride(0), BITS=bits, HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y
