"""Triton device functions shared by several kernels (imported only where triton is)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_acc(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b; DOT_F32 upcasts the tiles first (where the GPU has no tensor-core dot for their dtype)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def scale_rows_and_columns(acc, rows, cols, M, N, row_scale_ptr, col_scale_ptr, bias_ptr, ROW_SCALES: tl.constexpr,
                           COL_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A W8A8 GEMM's epilogue: acc [rows, cols] float32 * x's scale (per row, or one) * the weight's (per column, or
    one) + bias[col], in this order (torch._scaled_mm's)."""
    if ROW_SCALES:
        acc = acc * tl.load(row_scale_ptr + rows, mask=rows < M, other=0.0)[:, None]
    else:
        acc = acc * tl.load(row_scale_ptr)
    if COL_SCALES:
        acc = acc * tl.load(col_scale_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    else:
        acc = acc * tl.load(col_scale_ptr).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return acc
