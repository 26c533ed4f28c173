"""Build-time tuning of the fused weight-only kernel: for each distinct quantized weight shape and format of an engine
and each row bucket 1..64, time the candidate launch configs on this GPU (random stored weights: the speed does not
depend on the values; GPU time per call in CUDA graph replays, as decode runs them: kiln.kernels.gpu_timing) and
keep the fastest that computes correctly. `kiln build` stores the result under kernels.weight_only; loading binds it
(kiln.kernels.bind_linear_matmuls). The unquantized bf16 matmul of the same shape is timed beside it, for the
record."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kiln.kernels.gpu_timing import graph_us, weight_copies
from kiln.kernels.triton_weight_only import WeightOnlyFormat, _launch_fused, dequantize_weight
from kiln.kernels.triton_weight_only_configs import WO_ROW_BUCKETS, WoConfig, candidate_wo_configs, entry_to_dict

WoShape = tuple[int, int, int, int]  # (N, K logical, bits, group_size)


def _random_weight(shape: WoShape, dtype: torch.dtype, device: torch.device):
    n, k, bits, group = shape
    stored = torch.randint(-128, 128, (n, k * bits // 8), dtype=torch.int8, device=device)
    if group == 0:
        return stored, torch.rand(n, dtype=dtype, device=device) * 0.02 + 0.01, None
    groups = -(-k // group)
    scale = torch.rand(n, groups, dtype=dtype, device=device) * 0.02 + 0.01
    return stored, scale, torch.randint(0, 2**bits, (n, groups), device=device).to(dtype)


def _agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    tol = 1e-3 if out.dtype == torch.float32 else 3e-2
    scale = ref.float().abs().max().item() or 1.0
    return bool(torch.isfinite(out).all()) and (out.float() - ref.float()).abs().max().item() <= tol * scale


def tune_shape(shape: WoShape, rows: int, dtype: torch.dtype, device: torch.device,
               log: Callable[[str], None] | None = None) -> tuple[WoConfig | None, float, float]:
    """(fastest correct config or None, its us, the bf16 cuBLAS us) at `rows` rows: GPU times per call from CUDA
    graph replays over enough copies of the weight to miss L2 (kiln.kernels.gpu_timing), as decode runs them."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    n, k, bits, group = shape
    fmt = WeightOnlyFormat(bits, group)
    first = _random_weight(shape, dtype, device)
    stored_bytes = sum(t.numel() * t.element_size() for t in first if t is not None)
    weights = [first] + [_random_weight(shape, dtype, device) for _ in range(weight_copies(stored_bytes, device) - 1)]
    x = torch.randn(rows, k, dtype=dtype, device=device)
    dense = [dequantize_weight(*w, fmt, dtype) for w in weights[:weight_copies(n * k * 2, device)]]
    ref = F.linear(x, dense[0])
    bf16_us = graph_us([lambda d=d: F.linear(x, d) for d in dense])
    del dense
    best, best_us = None, math.inf
    for config in candidate_wo_configs(rows, bits, group):
        try:
            if not _agrees(_launch_fused(x, *first, None, fmt, config), ref):
                if log is not None:
                    log(f"  weight-only {config} gives wrong results at {rows}x{n}x{k}; skipped")
                continue
            us = graph_us([lambda w=w: _launch_fused(x, *w, None, fmt, config) for w in weights])
        except (OutOfResources, CompilationError):
            continue
        except Exception as err:  # noqa: BLE001 - a candidate failing any other way is not a choice either
            if log is not None:
                log(f"  weight-only {config} failed at {rows}x{n}x{k} ({type(err).__name__}: {err}); skipped")
            continue
        if us < best_us:
            best, best_us = config, us
    return best, best_us, bf16_us


def tune_weight_only_shapes(shapes: list[WoShape], dtype: torch.dtype, device: torch.device, budget_s: float = 45.0,
                            log: Callable[[str], None] | None = None) -> list[dict]:
    """The kernels.weight_only entries: every shape x row bucket timed on this GPU while `budget_s` lasts (the
    largest weights first); the rest, and everything off a GPU, recorded untuned (the default config)."""
    start = time.perf_counter()
    entries: list[dict] = []
    for shape in sorted(set(shapes), key=lambda s: -s[0] * s[1] * s[2]):
        for rows in WO_ROW_BUCKETS:
            if device.type != "cuda" or time.perf_counter() - start > budget_s:
                entries.append(entry_to_dict(rows, shape, None, False))
                continue
            best, best_us, bf16_us = tune_shape(shape, rows, dtype, device, log)
            entries.append(entry_to_dict(rows, shape, best, True, best_us if best else None, bf16_us))
            if log is not None:
                log(f"  weight-only {shape[0]}x{shape[1]} int{shape[2]} g{shape[3]} rows {rows:2d}: {best} "
                    f"{best_us:.1f} us (bf16 cuBLAS {bf16_us:.1f} us; {time.perf_counter() - start:.0f} s)")
    return entries
