"""Triton kernels of the thin-matrix (decode) GEMM y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 16 (the launcher
is in triton_gemv.py).

At decode the weights are read once per step and the rows of x are few, so the kernel is a weight stream: each
program owns BLOCK_N rows of W and walks its slice of K in BLOCK_K steps, each step one wide load of a [BLOCK_N,
BLOCK_K] tile, contiguous along K as torch stores linear weights. Two ways to multiply it:

- dot: the transposed product y^T = W @ x^T on the tensor cores, the tile times a [BLOCK_K, 16] tile of x (rows past
  M masked to zero). tl.dot needs 16 on every side, which the weight tile has and the 16 padded rows give; the
  wasted products cost nothing next to the memory time, and the matmul path gets Triton's software pipelining
  (num_stages tiles in flight).
- fma (one row only): each thread multiplies its part of the tile by x in fp32 registers and keeps the products
  apart, one cross-thread reduction at the very end.

With SPLIT, program (n, s) covers only the s-th slice of K and writes its fp32 partial to part[s]; a second kernel
(gemv_reduce_kernel), or the last program of each output block to finish (reduce_splits_if_last), sums the slices
in a fixed order, so results are the same on every run and the launch is graph-safe.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_jit_common import dot_acc


@triton.jit
def _gemv_step(i, x_ptrs, w_ptrs, acc, offs_k, n_ok, m_ok, span,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, DOT_F32: tl.constexpr,
               PRECISION: tl.constexpr):
    """Step i of a program's K slice (`span` elements long): load the weight tile and x, accumulate in fp32."""
    shift = i * BLOCK_K
    if EVEN_K:
        # No mask along K: the loads stay 16-byte vectors (a runtime K bound would split them).
        w = tl.load(w_ptrs + shift, mask=n_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_K]
        if DOT:
            x = tl.load(x_ptrs + shift, mask=m_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        else:
            x = tl.load(x_ptrs + shift)  # [BLOCK_K]
    else:
        k_ok = offs_k < span - shift
        w = tl.load(w_ptrs + shift, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT:
            x = tl.load(x_ptrs + shift, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs + shift, mask=k_ok, other=0.0)
    # One return at the end: Triton compiles the code after a constexpr `if` that returns, so the fma expression
    # must sit in an else (on [BLOCK_K, BLOCK_M] dot inputs it does not type-check).
    if DOT:
        acc = dot_acc(w, x, acc, DOT_F32, PRECISION)  # [BLOCK_N, BLOCK_M]
    else:
        acc = acc + w.to(tl.float32) * x.to(tl.float32)[None, :]  # [BLOCK_N, BLOCK_K], summed over K at the end
    return acc


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, k_per_split, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), splits): program (n, s) computes y[:, n block] over K slice s (all of K without
    SPLIT). Without DOT only row 0 is computed (the launcher sends one-row inputs only)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    k_start = pid_k * k_per_split
    span = tl.minimum(K - k_start, k_per_split)
    steps = tl.cdiv(span, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    if DOT:
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k_start + offs_k)[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        x_ptrs = x_ptr + k_start + offs_k
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if WHILE_LOOP:
        i = 0
        while i < steps:
            acc = _gemv_step(i, x_ptrs, w_ptrs, acc, offs_k, n_ok, m_ok, span, BLOCK_K, EVEN_K, DOT, DOT_F32,
                             PRECISION)
            i += 1
    else:
        for i in range(0, steps):
            acc = _gemv_step(i, x_ptrs, w_ptrs, acc, offs_k, n_ok, m_ok, span, BLOCK_K, EVEN_K, DOT, DOT_F32,
                             PRECISION)
    if DOT:
        _store_rows(acc, offs_n, n_ok, offs_m, m_ok, pid_k, b_ptr, y_ptr, part_ptr, M, N, stride_ym, HAS_BIAS, SPLIT)
    else:
        _store_row(tl.sum(acc, axis=1), offs_n, n_ok, pid_k, b_ptr, y_ptr, part_ptr, N, HAS_BIAS, SPLIT)


@triton.jit
def _store_rows(acc, offs_n, n_ok, offs_m, m_ok, pid_k, b_ptr, y_ptr, part_ptr, M, N, stride_ym,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] is y^T of this block: to part[pid_k] in fp32, or (+ bias) to y."""
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT:
        ptrs = part_ptr + (pid_k * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None]
        tl.store(ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_row(acc, offs_n, n_ok, pid_k, b_ptr, y_ptr, part_ptr, N, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """acc [BLOCK_N] is row 0 of this block (M = 1): to part[pid_k] in fp32, or (+ bias) to y."""
    if SPLIT:
        tl.store(part_ptr + pid_k.to(tl.int64) * N + offs_n, acc, mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def gemv_reduce_kernel(
    part_ptr, b_ptr, y_ptr, M, N, splits, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """y[m, n block] = sum over s of part[s, m, n block] (+ bias), in one fixed order. Grid (cdiv(N, BLOCK), M)."""
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    s = tl.arange(0, SPLIT_PAD)
    ptrs = part_ptr + (s[:, None] * M + m).to(tl.int64) * N + offs[None, :]
    part = tl.load(ptrs, mask=(s < splits)[:, None] & ok[None, :], other=0.0)  # [SPLIT_PAD, BLOCK] fp32
    y = tl.sum(part, axis=0)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def last_split_to_arrive(count_ptr, splits):
    """Called by every program of a split-K kernel right after it stored its partial: counts the program in at
    count_ptr (one int32 per output block, 0 between launches) and says whether it is the last of the block's
    `splits` programs to arrive, the one that sums the partials (sum_splits) and sets the counter back to 0 (for the
    next launch and CUDA graph replays). The barrier before the count puts every thread's partial into the
    program's release."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    return arrived == splits - 1


@triton.jit
def sum_splits(part_ptr, part_offs, split_stride, mask, splits, WHILE_LOOP: tl.constexpr):
    """The sum over s < splits of the partials at part_ptr + s * split_stride + part_offs, in split order (the same
    result whatever order the programs finished in), in the partials' dtype (fp32, or int32: exact). Read past L1
    (.cg), which may still hold lines of this buffer from an earlier program on the same SM."""
    total = tl.zeros(part_offs.shape, dtype=part_ptr.dtype.element_ty)
    if WHILE_LOOP:
        s = 0
        while s < splits:
            total += tl.load(part_ptr + s * split_stride + part_offs, mask=mask, other=0, cache_modifier=".cg")
            s += 1
    else:
        for s in range(0, splits):
            total += tl.load(part_ptr + s * split_stride + part_offs, mask=mask, other=0, cache_modifier=".cg")
    return total


@triton.jit
def reduce_splits_if_last(part_ptr, part_offs, split_stride, y_ptr, y_offs, b_ptr, b_offs, mask, count_ptr,
                          HAS_BIAS: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """The split-K sum without a second launch, called by every program of a split kernel (grid axis 1: the splits)
    right after it stored its fp32 partial at part_ptr + s * split_stride + part_offs: the last program of the
    output block to arrive (last_split_to_arrive) sums all the partials, adds the bias and stores y at
    y_ptr + y_offs."""
    splits = tl.num_programs(1)
    if last_split_to_arrive(count_ptr, splits):
        total = sum_splits(part_ptr, part_offs, split_stride, mask, splits, WHILE_LOOP)
        if HAS_BIAS:
            total += tl.load(b_ptr + b_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
