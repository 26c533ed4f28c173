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


@triton.jit
def mlp_activation_row(x_ptr, row, stride_x, cols, mask, dim, GATED: tl.constexpr):
    """One row of a dense MLP's activation in float32, masked lanes 0: silu(gate) * up (GATED: x's row holds
    [gate; up], dim each) or exact GELU (x's row dim wide), each op's result rounded to x's dtype as torch's separate
    ops leave it (kiln.layers.mlp). The body of the quantizing activations (SmoothQuant's, FP8's)."""
    base = x_ptr + row * stride_x + cols
    dtype = x_ptr.dtype.element_ty
    if GATED:
        gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(base + dim, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        act = (silu * up).to(dtype).to(tl.float32)
    else:
        v = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        act = (0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))).to(dtype).to(tl.float32)
    return tl.where(mask, act, 0.0)
