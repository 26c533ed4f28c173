"""Launcher of the one-row weight-only kernel (triton_weight_only_gemv_kernels.py): y[1, N] = x[1, K] @ dequant(W).T
(+ bias) for bf16 x, the decode step at batch 1. Same formats, checks, split-K plan and fixed-order reduction as the
tensor-core kernel's launcher (triton_weight_only.py); the build's tuning times both and keeps the faster."""

from __future__ import annotations

import torch

from kiln.kernels.triton_common import cdiv, matmul_output, while_loops
from kiln.kernels.triton_gemv import last_program_counters, launch_split_reduce
from kiln.kernels.triton_weight_only_configs import WoConfig
from kiln.kernels.triton_weight_only_gemv_kernels import weight_only_gemv_kernel


def gemv_applies(x: torch.Tensor, k_offset: int) -> bool:
    """One bf16 row starting at an even element, an even K and k_offset: INT4 reads x as int32 bf16 pairs."""
    return (x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.shape[1] % 2 == 0 and k_offset % 2 == 0
            and x.storage_offset() % 2 == 0)


def launch_gemv(x, weight, scale, zero, bias, fmt, config: WoConfig, plan) -> torch.Tensor:
    """x [1, K] bf16 (contiguous) -> y [1, N]; `plan` is triton_weight_only._plan's split of K for this config."""
    k = x.shape[1]
    n = weight.shape[0]
    y, done = matmul_output(x, n, bias)
    if done:
        return y
    split = plan.splits > 1
    part = torch.empty(plan.splits, 1, n, dtype=torch.float32, device=x.device) if split else y
    bias_arg = bias if bias is not None else scale  # never read without HAS_BIAS
    x_arg = x.view(torch.int32) if fmt.bits == 4 else x  # INT4: bf16 pairs (x[2j], x[2j + 1]) as int32 words
    blocks = cdiv(n, config.block_n)
    counters = last_program_counters(x.device, split, blocks)
    last_reduces = counters is not None
    weight_only_gemv_kernel[(blocks, plan.splits)](
        x_arg, weight, scale, zero if zero is not None else scale, bias_arg, y, part,
        counters if last_reduces else part, n, k, weight.shape[1], fmt.k_offset, plan.v_per_split, weight.stride(0),
        scale.stride(0), BITS=fmt.bits, GROUP=fmt.group_size, HAS_ZERO=zero is not None,
        HAS_BIAS=bias is not None and (not split or last_reduces), SPLIT=split, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, EVEN_K=fmt.k_offset == 0 and k % config.block_k == 0,
        PREFETCH=config.num_stages >= 2, LAST_REDUCES=last_reduces, WHILE_LOOP=while_loops(x.device),
        num_warps=config.num_warps,
    )
    if split and not last_reduces:
        launch_split_reduce(part, bias, y)
    return y
