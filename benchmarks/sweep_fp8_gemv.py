"""FP8 W8A8 at decode rows on one GPU: the Triton quantization + FP8 GEMV (kiln.kernels.triton_fp8_gemv) over a grid
of launch parameters, beside the Triton quantization + torch._scaled_mm and bf16 cuBLAS, at MPT-7B's layer shapes,
each timed as decode runs it (back to back in a CUDA graph over enough weight copies to miss L2:
kiln.kernels.gpu_timing). Prints one line per (shape, rows): bf16, _scaled_mm, the default config, the best config
and its GB/s; then the best config overall (geometric mean over the cases) and writes every time to --output_json.

    python benchmarks/sweep_fp8_gemv.py [--rows 1 16] [--output_json out/fp8_gemv.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch
import torch.nn.functional as F

from kiln.kernels.gpu_timing import graph_us, weight_copies
from kiln.kernels.triton_fp8_gemv import Fp8GemvConfig, fp8_gemv
from kiln.kernels.triton_fp8_quant import quantize_fp8_rows
from kiln.quant.fp8 import quantize_weight

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "up": (16384, 4096), "down": (4096, 16384)}  # (N, K)
GRID = [Fp8GemvConfig(n, k, w, s) for n, k, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4))
        if not (n == 64 and k == 512)] + [Fp8GemvConfig(split_k=0)]  # split_k 0: split_for's choice of K slices


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", nargs="+", type=int, default=[1, 16])
    p.add_argument("--output_json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_fp8_gemv needs a CUDA GPU with FP8 tensor cores")
    dev = torch.device("cuda")
    results, ratios = [], {c: [] for c in GRID}
    for (name, (n, k)), rows in itertools.product(SHAPES.items(), args.rows):
        copies = weight_copies(n * k, dev)
        ws = [quantize_weight(torch.randn(n, k, device=dev) * 0.02, True, torch.float32) for _ in range(copies)]
        bf = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(weight_copies(2 * n * k, dev))]
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        t_bf16 = graph_us([lambda w=w: F.linear(x, w) for w in bf])
        t_mm = graph_us([lambda q=q, s=s: _scaled_mm(x, q, s) for q, s in ws])
        times = {}
        for config in GRID:
            try:
                times[config] = graph_us([lambda q=q, s=s, c=config: fp8_gemv(*quantize_fp8_rows(x, None), q, s, None,
                                                                               torch.bfloat16, c) for q, s in ws])
            except Exception as err:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"  {config}: {type(err).__name__}: {str(err)[:120]}")
        best = min(times, key=times.get)
        for config, t in times.items():
            ratios[config].append(t / times[best])
        default = times.get(Fp8GemvConfig())
        print(f"{name} {n}x{k} rows {rows}: bf16 {t_bf16:.1f} us, quantize+_scaled_mm {t_mm:.1f} us, "
              f"gemv default {default:.1f} us, best {times[best]:.1f} us {best} = {n * k / times[best] / 1e3:.0f} GB/s")
        results.append({"shape": name, "n": n, "k": k, "rows": rows, "bf16_us": t_bf16, "scaled_mm_us": t_mm,
                         "gemv_us": {str(tuple(c)): t for c, t in times.items()}})
    ranked = sorted((math.exp(sum(map(math.log, r)) / len(r)), c) for c, r in ratios.items() if r)
    for geo, config in ranked[:6]:
        print(f"geomean {geo:.3f} x best: {config}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"cases": results, "ranked": [[g, tuple(c)] for g, c in ranked]}, f, indent=1)


def _scaled_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    xq, xs = quantize_fp8_rows(x, None)
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.reshape(1, -1), out_dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
