"""A Triton GEMV for FP8 W8A8 at decode row counts: y[M, N] = (q_x[M, K] @ q_w[N, K].T) * s_x[m] * s_w[n] (+ bias),
both operands float8_e4m3fn (x quantized by kiln.kernels.triton_fp8_quant), the products summed in float32 and
scaled once at the end: torch._scaled_mm's contract, up to summation order.

Why beside _scaled_mm: a decode step of batch 1-16 reads every weight once and multiplies little, so bytes are the
time; cuBLAS's FP8 GEMM is built for large M. Each program owns BLOCK_N output rows and all M (<= BLOCK_M = 16)
rows of x; it walks K in BLOCK_K tiles, each weight tile loaded once in its stored byte, widened to float16 (exact
for every e4m3 value; float32 on the CPU interpreter) and multiplied on the tensor cores as a [16, BLOCK_K] @
[BLOCK_K, BLOCK_N] dot with a float32 accumulator. Where the column blocks are too few to fill the GPU (N = 4096
at 32 columns a block is 128 programs on 132 SMs) K is split, the last program of each block summing the float32
partials in split order (triton_gemv_kernels' last_split_to_arrive / sum_splits: one launch, graph-safe,
deterministic). kiln.quant.fp8_layers binds it for decode rows (KILN_FP8_GEMV=0
turns it off) where a GPU measured it faster (docs/performance.md, benchmarks/sweep_fp8_gemv.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_common import multiprocessor_count, split_counters, while_loops
from kiln.kernels.triton_gemv_kernels import last_split_to_arrive, sum_splits
from kiln.kernels.triton_jit_common import dot_acc, scale_rows_and_columns

BLOCK_M = 16  # tl.dot needs 16 on every side; rows of x past M are masked to zero
MAX_ROWS = 16


class Fp8GemvConfig(NamedTuple):
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    # 1: never split (the default: on an H100 splitting MPT-7B's o_proj 3 ways took 12.9 us against 12.1 unsplit,
    # down_proj 32.1 against 31.5: benchmarks/sweep_fp8_gemv.py, session 10); 0: enough K slices for about two
    # programs per SM (split_for); n: n slices
    split_k: int = 1


def split_for(n: int, k: int, config: Fp8GemvConfig, sms: int) -> int:
    """K slices for an [N, K] weight: 1 where the column blocks alone give two programs per SM (MPT-7B's QKV and up
    projections), else enough to get there (its o_proj and down_proj: N = 4096 is 128 blocks of 32 on an H100's 132
    SMs, whose o_proj ran at 1.4 TB/s unsplit), keeping at least two K tiles per slice."""
    if config.split_k:
        return config.split_k
    blocks, tiles = triton.cdiv(n, config.block_n), triton.cdiv(k, config.block_k)
    return max(1, min(triton.cdiv(2 * sms, blocks), tiles // 2))


@triton.jit
def fp8_gemv_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K: tl.constexpr, stride_xm,
                    stride_wn, stride_ym, ROW_SCALES: tl.constexpr, PER_CHANNEL: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                    TILES_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, WHILE_LOOP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), splits): program (n, s) sums K tiles [s * TILES_PER_SPLIT, (s + 1) * TILES_PER_SPLIT)
    of its column block. SPLIT: the float32 partial goes to part [splits, BLOCK_M, N] and the last program of the
    block to arrive (count_ptr: one int32 per block, 0 on entry and exit) sums the partials in split order and runs
    the epilogue: deterministic, one launch, graph-safe."""
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * (TILES_PER_SPLIT * BLOCK_K)
    for i in range(0, TILES_PER_SPLIT):  # a constexpr count: the interpreter takes it, the GPU pipelines it
        offs_k = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K] fp8
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K] fp8
        # float16 holds every e4m3 value exactly and sm_90 widens e4m3 pairs to it in one instruction (to bfloat16
        # it takes three: the sm_90 PTX of this loop had 341 conversions with bf16 tiles, 149 with f16)
        acc = dot_acc(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc, DOT_F32, PRECISION)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        part_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_s * (BLOCK_M * N) + part_offs, acc, mask=mask)
        count = count_ptr + pid
        if last_split_to_arrive(count, tl.num_programs(1)):
            acc = sum_splits(part_ptr, part_offs, BLOCK_M * N, mask, tl.num_programs(1), WHILE_LOOP)
            _finish(acc, offs_m, offs_n, M, N, xs_ptr, s_ptr, b_ptr, y_ptr, stride_ym, mask, ROW_SCALES, PER_CHANNEL,
                    HAS_BIAS)
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")
    else:
        _finish(acc, offs_m, offs_n, M, N, xs_ptr, s_ptr, b_ptr, y_ptr, stride_ym, mask, ROW_SCALES, PER_CHANNEL,
                HAS_BIAS)


@triton.jit
def _finish(acc, offs_m, offs_n, M, N, xs_ptr, s_ptr, b_ptr, y_ptr, stride_ym, mask, ROW_SCALES: tl.constexpr,
            PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr):
    acc = scale_rows_and_columns(acc, offs_m, offs_n, M, N, xs_ptr, s_ptr, b_ptr, ROW_SCALES, PER_CHANNEL, HAS_BIAS)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def fp8_gemv(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, config: Fp8GemvConfig = Fp8GemvConfig()
             ) -> torch.Tensor:
    """xq [M <= 16, K] float8_e4m3fn (contiguous along K), x_scale float32 [1] or [M, 1], weight [N, K]
    float8_e4m3fn, w_scale [1] or [N] -> [M, N] in out_dtype. Split along K per `config` (split_for), unsplit where
    no counters can be had (first use inside a CUDA graph capture: binding allocates them before)."""
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
    blocks, tiles = triton.cdiv(n, config.block_n), max(1, triton.cdiv(k, config.block_k))
    splits = min(split_for(n, k, config, multiprocessor_count(xq.device)), tiles)
    counters = split_counters(xq.device) if splits > 1 else None
    if counters is None or blocks > counters.numel():
        splits = 1
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)  # no empty slice
    part = torch.empty(splits, BLOCK_M, n, dtype=torch.float32, device=xq.device) if splits > 1 else y
    fp32 = out_dtype == torch.float32
    fp8_gemv_kernel[(blocks, splits)](
        xq, x_scale, weight, w_scale, bias if bias is not None else w_scale, y, part,
        counters if splits > 1 else part, m, n, k, xq.stride(0), weight.stride(0), y.stride(0),
        ROW_SCALES=x_scale.numel() != 1 or m == 1, PER_CHANNEL=w_scale.numel() != 1 or n == 1,
        HAS_BIAS=bias is not None, DOT_F32=fp32, PRECISION="ieee" if fp32 else "tf32", TILES_PER_SPLIT=per_split,
        SPLIT=splits > 1, WHILE_LOOP=while_loops(xq.device), BLOCK_M=BLOCK_M, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    return y
