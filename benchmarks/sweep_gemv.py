"""Sweep of the one-row weight-only kernel's launch parameters (tile rows, tile depth, warps, prefetch, split K) at
MPT-7B's and Baichuan2-13B's layer shapes, batch 1, against bf16 cuBLAS: which of them move the kernel toward the
bandwidth floor, and how far the build's candidate list (triton_weight_only_configs) is from the best of the grid.
Prints one line per (layer, format): bf16 us, best of the build's candidates, best of the grid with its config and
GB/s; then, per parameter value, the geometric mean of (best time with that value / best time) over all cases.

    python benchmarks/sweep_gemv.py [--formats int8 int4 int4_g128] [--budget_s 150]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
import triton.testing

from bench_weight_only import FORMATS, SHAPES, quantized
from kiln.kernels.triton_weight_only import _launch_fused
from kiln.kernels.triton_weight_only_configs import WoConfig, candidate_wo_configs

ROWS_WARPS = ((32, 4), (64, 4), (128, 8))
STORED_BYTES = (64, 128)  # per row per tile (group-wise: cut to the group)
STAGES = (1, 2)  # 1: no prefetch, 2: the next tile loaded while this one is multiplied
SPLITS = (0, 2, 4, 8, 16)  # 0: the automatic split (about two programs per SM)


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=2, rep=8, return_mode="median") * 1e3


def grid(bits: int, group: int) -> list[WoConfig]:
    out = []
    for (block_n, warps), nbytes, stages, split in itertools.product(ROWS_WARPS, STORED_BYTES, STAGES, SPLITS):
        block_k = nbytes * 8 // bits
        if group:
            block_k = min(block_k, group)
        config = WoConfig(block_n, block_k, split, warps, stages, True)
        if config not in out:
            out.append(config)
    return out


def time_configs(configs, x, stored, scale, zero, fmt) -> dict[WoConfig, float]:
    times = {}
    for config in configs:
        try:
            times[config] = us(lambda: _launch_fused(x, stored, scale, zero, None, fmt, config))
        except Exception as err:  # noqa: BLE001 - a config that does not compile is reported, not fatal
            print(f"  {config}: {type(err).__name__}")
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--budget_s", type=float, default=150.0)
    args = p.parse_args()
    start = time.perf_counter()
    effect: dict[tuple[str, object], list[float]] = defaultdict(list)
    print("| layer | format | bf16 us | build candidates best us | grid best us | grid best config | GB/s | x bf16 |")
    for (label, (n, k)), name in itertools.product(SHAPES.items(), args.formats):
        if time.perf_counter() - start > args.budget_s:
            print(f"(budget of {args.budget_s:.0f} s spent: stopped before {label} {name})")
            break
        fmt = FORMATS[name]
        stored, scale, zero = quantized(fmt, n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        base = us(lambda: F.linear(x, dense))
        del dense
        candidates = time_configs(candidate_wo_configs(1, fmt.bits, fmt.group_size), x, stored, scale, zero, fmt)
        times = time_configs(grid(fmt.bits, fmt.group_size), x, stored, scale, zero, fmt)
        best = min(times, key=times.get)
        nbytes = stored.numel() + scale.numel() * 2 + (0 if zero is None else zero.numel() * 2)
        print(f"| {label} | {name} | {base:.1f} | {min(candidates.values()):.1f} | {times[best]:.1f} | {best} | "
              f"{nbytes / times[best] / 1e3:.0f} | {base / times[best]:.2f} |", flush=True)
        for field in ("block_n", "block_k", "num_warps", "num_stages", "split_k"):
            for value in {getattr(c, field) for c in times}:
                effect[(field, value)].append(min(t for c, t in times.items() if getattr(c, field) == value)
                                              / times[best])
    print("\n| parameter | value | geomean (best with it / best) | cases |")
    for (field, value), ratios in sorted(effect.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"| {field} | {value} | {mean:.3f} | {len(ratios)} |")


if __name__ == "__main__":
    main()
