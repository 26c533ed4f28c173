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
