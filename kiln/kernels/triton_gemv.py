"""Launcher of kiln's thin-matrix (decode) GEMM (contract: reference.linear, which is F.linear; kernels in
triton_gemv_kernels.py), the build-time tuner that decides per weight shape and row bucket whether it beats cuBLAS,
and the per-layer callable that the model's linear layers use once an engine's choices are bound.

Nothing syncs with the host (the split-K partials are summed by a second launch, not atomics), so it captures in a
CUDA graph and gives the same bits on every run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.gpu_timing import graph_us, weight_copies
from kiln.kernels.triton_common import FLOAT_DTYPES, cdiv, check_device, check_shape, check_tensor, dot_precision
from kiln.kernels.triton_common import dot_upcast, matmul_output, multiprocessor_count, next_power_of_2, split_counters
from kiln.kernels.triton_common import while_loops
from kiln.kernels.triton_gemv_configs import DOT_ROWS, MAX_ROWS, ROW_BUCKETS, GemvConfig, GemvKey
from kiln.kernels.triton_gemv_configs import candidate_configs, default_config, entry_to_dict, rows_table
from kiln.kernels.triton_gemv_kernels import gemv_kernel, gemv_reduce_kernel

__all__ = ["GemvConfig", "GemvMatmul", "GemvTiming", "bind_gemv", "gemv", "tune_gemv", "tune_linear_shapes"]


def _check_inputs(x, weight, bias, config: GemvConfig) -> None:
    check_tensor("x", x, 2, FLOAT_DTYPES)
    device = x.device
    check_device(device)
    check_tensor("weight", weight, 2, (x.dtype,), device)
    rows, k = x.shape
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} features but weight of shape {tuple(weight.shape)} takes {weight.shape[1]} "
                         "(weight is [out_features, in_features], as torch's Linear stores it)")
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows of x, got {rows}; use F.linear for more")
    if bias is not None:
        check_tensor("bias", bias, 1, (x.dtype,), device)
        check_shape("bias", bias, (weight.shape[0],))
    if not isinstance(config, GemvConfig):
        raise ValueError(f"config must be a GemvConfig, got {type(config).__name__}")
    if not config.dot and rows != 1:
        raise ValueError(f"the FMA (dot=False) config serves one row of x, got {rows}; use a dot config")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            config: GemvConfig) -> torch.Tensor:  # x [M, K], weight [N, K] -> y [M, N]
    """The kernel launch(es), inputs already checked."""
    rows, k = x.shape
    n = weight.shape[0]
    y, done = matmul_output(x, n, bias)
    if done:
        return y
    block_k = config.block_k
    steps = cdiv(k, block_k)
    per_split = cdiv(steps, min(config.split_k, steps)) * block_k  # whole steps per slice
    splits = cdiv(k, per_split)  # no empty slice
    part = torch.empty(splits, rows, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    bias_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    gemv_kernel[(cdiv(n, config.block_n), splits)](
        x, weight, bias_arg, y, part, rows, n, k, per_split, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None and splits == 1, SPLIT=splits > 1, BLOCK_M=DOT_ROWS, BLOCK_N=config.block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, DOT=config.dot, DOT_F32=dot_upcast(x.dtype, x.device),
        PRECISION=dot_precision(x.dtype), WHILE_LOOP=while_loops(x.device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        launch_split_reduce(part, bias, y)
    return y


# Split K summed by the split kernel's last program of each output block (reduce_splits_if_last: no second launch);
# False: by gemv_reduce_kernel after (launch_split_reduce). Read at each launch, so a test can switch it.
LAST_PROGRAM_REDUCES = True


def last_program_counters(device: torch.device, split: bool, output_blocks: int) -> torch.Tensor | None:
    """The counters a split kernel's last programs sum with (kiln.kernels.triton_common.split_counters), or None
    when launch_split_reduce must sum instead: no split, LAST_PROGRAM_REDUCES off, a CUDA graph capture before the
    counters exist, or more output blocks than counters."""
    if not split or not LAST_PROGRAM_REDUCES:
        return None
    counters = split_counters(device)
    return counters if counters is not None and output_blocks <= counters.numel() else None


def launch_split_reduce(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y [rows, N] = the sum over splits of part [splits, rows, N] fp32 (+ bias), in a fixed order (one kernel)."""
    splits, rows, n = part.shape
    split_pad = max(2, next_power_of_2(splits))
    block = min(1024, 8192 // split_pad, max(64, next_power_of_2(n)))  # <= 8192 partials in registers
    gemv_reduce_kernel[(cdiv(n, block), rows)](
        part, bias if bias is not None else part, y, rows, n, splits, y.stride(0),
        HAS_BIAS=bias is not None, SPLIT_PAD=split_pad, BLOCK=block, num_warps=4,
    )


def gemv(
    x: torch.Tensor,  # [M, K], M in 1..16
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: GemvConfig | None = None,
) -> torch.Tensor:  # [M, N]
    """Triton version of F.linear(x, weight, bias) for decode-sized M, accumulated in fp32 (default config when
    none is given)."""
    config = default_config() if config is None else config
    _check_inputs(x, weight, bias, config)
    return _launch(x, weight, bias, config)


class GemvMatmul:
    """One linear layer's matmul (the `matmul` hook of kiln.layers.linear.LinearBase): the Triton GEMV at the row
    counts where the build measured it faster than cuBLAS for this weight's shape, F.linear at every other. The
    choice is one tuple index per call; the weight was checked when the layer was bound."""

    __slots__ = ("configs",)

    def __init__(self, configs: tuple[GemvConfig | None, ...]) -> None:
        if len(configs) != MAX_ROWS + 1:
            raise ValueError(f"GemvMatmul takes one entry per row count 0..{MAX_ROWS}, got {len(configs)}")
        self.configs = configs

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.shape[0]
        if rows <= MAX_ROWS and x.dim() == 2 and x.dtype == weight.dtype and x.stride(-1) == 1:
            config = self.configs[rows]
            if config is not None:
                return _launch(x, weight, bias, config)
        return F.linear(x, weight, bias)

    def __repr__(self) -> str:
        rows = [r for r, c in enumerate(self.configs) if c is not None]
        return f"GemvMatmul(triton at rows {rows}, F.linear elsewhere)"


def _bindable(module: nn.Module) -> bool:
    """A layer with the matmul hook and a plain float weight the kernel can read (K-contiguous, one dtype)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not hasattr(module, "matmul") or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    if weight.dtype not in FLOAT_DTYPES or weight.device.type not in ("cuda", "cpu") or weight.stride(-1) != 1:
        return False
    return bias is None or (bias.dtype == weight.dtype and bias.dim() == 1 and bias.stride(0) == 1)


def bind_gemv(model: nn.Module, table: dict[GemvKey, GemvConfig]) -> int:
    """Give every hooked linear layer of `model` whose weight shape has a Triton choice in `table` a GemvMatmul;
    the others keep F.linear. Returns how many layers were bound."""
    bound = 0
    for module in model.modules():
        if not _bindable(module):
            continue
        configs = rows_table(table, *module.weight.shape)
        if any(c is not None for c in configs):
            module.matmul = GemvMatmul(configs)
            bound += 1
    return bound


# Short timings: the build tunes every distinct linear shape at five row buckets within a minute or so.
_WIN_MARGIN = 0.97  # Triton must beat cuBLAS by 3%: a tie is not worth leaving the library for


def _agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """A candidate's result against F.linear (unit-scale outputs): a config that miscomputes on this GPU is never
    chosen, whatever its speed."""
    tol = 1e-3 if out.dtype == torch.float32 else 3e-2
    return bool(torch.isfinite(out).all()) and torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol)


@dataclass(frozen=True)
class GemvTiming:
    """One (rows, N, K) timed on the GPU: the fastest correct Triton config (None if none ran) and its median ms,
    and cuBLAS's (F.linear) median ms."""

    best: GemvConfig | None
    triton_ms: float
    cublas_ms: float

    @property
    def winner(self) -> GemvConfig | None:
        """The Triton config when it beat cuBLAS by the margin, else None (cuBLAS)."""
        return self.best if self.best is not None and self.triton_ms < _WIN_MARGIN * self.cublas_ms else None


def tune_gemv(rows: int, weight: torch.Tensor, sms: int | None = None,
              log: Callable[[str], None] | None = None) -> GemvTiming:
    """Time F.linear and the candidate configs at `rows` rows of random input against `weight` [N, K] on its GPU:
    GPU time per call in CUDA graph replays over enough copies of the weight to miss L2, as a decode step's graph
    runs them and finds the weights (kiln.kernels.gpu_timing; host launch costs, which the graph removes, would
    favour cuBLAS's lighter launch)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    n, k = weight.shape
    copies = weight_copies(weight.numel() * weight.element_size(), weight.device)
    weights = [weight] + [torch.randn_like(weight) * k**-0.5 for _ in range(copies - 1)]
    x = torch.randn(rows, k, dtype=weight.dtype, device=weight.device)
    ref = F.linear(x, weight)
    cublas_ms = graph_us([lambda w=w: F.linear(x, w) for w in weights]) / 1e3
    best, best_ms = None, math.inf
    for config in candidate_configs(rows, n, k, sms or multiprocessor_count(weight.device)):
        try:
            if not _agrees(_launch(x, weight, None, config), ref):
                if log is not None:
                    log(f"  gemv {config} gives wrong results at {rows}x{n}x{k}; skipped")
                continue
            ms = graph_us([lambda w=w: _launch(x, w, None, config) for w in weights]) / 1e3
        except (OutOfResources, CompilationError):
            continue
        except Exception as err:  # noqa: BLE001 - a candidate that fails in any other way is not a choice either
            if log is not None:
                log(f"  gemv {config} failed at {rows}x{n}x{k} ({type(err).__name__}: {err}); skipped")
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return GemvTiming(best, best_ms, cublas_ms)


def tune_linear_shapes(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device,
                       budget_s: float = 40.0, log: Callable[[str], None] | None = None) -> list[dict]:
    """For each distinct weight shape (N, K) and row bucket, F.linear against the Triton candidates on this GPU;
    returns the "linear" entries of the engine's kernels section (entry_to_dict). Shapes left when `budget_s`
    has passed, and every shape off a GPU, record cuBLAS untuned."""
    start = time.perf_counter()
    entries: list[dict] = []
    for n, k in sorted(set(shapes), key=lambda s: -s[0] * s[1]):  # the largest weights matter most: first
        if device.type != "cuda" or time.perf_counter() - start > budget_s:
            entries += [entry_to_dict(rows, n, k, None, False) for rows in ROW_BUCKETS]
            continue
        weight = torch.randn(n, k, dtype=dtype, device=device) * k**-0.5
        for rows in ROW_BUCKETS:
            timing = tune_gemv(rows, weight, log=log)
            triton_us = timing.triton_ms * 1e3 if math.isfinite(timing.triton_ms) else None
            entries.append(entry_to_dict(rows, n, k, timing.winner, True, triton_us, timing.cublas_ms * 1e3))
            if log is not None:
                who = "cuBLAS" if timing.winner is None else f"triton {timing.winner}"
                log(f"  linear {n}x{k} rows {rows:2d}: {who} (triton {timing.triton_ms * 1e3:.1f} us, cuBLAS "
                    f"{timing.cublas_ms * 1e3:.1f} us; {time.perf_counter() - start:.0f} s)")
        del weight
    return entries
