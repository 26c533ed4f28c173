"""FP8 W8A8 at prefill rows on one GPU: why a 2,048-token FP8 prefill of the MPT-7B shape ran no faster than bf16
(session 9). Times, per MPT-7B layer shape at --rows (default 2048), in CUDA graphs (kiln.kernels.gpu_timing):
bf16 cuBLAS; the Triton quantization alone; `torch._scaled_mm` with scalar (per-tensor) and row-wise scales, each
with and without fast accumulation (session 10 on an H100: every `_scaled_mm` way 1.57-1.74x bf16 over the four
layers; a Triton FP8 GEMM with the INT8 kernel's tiles reached 1.20-1.64x and was removed). Prints a table and the
four layers' totals; --output_json keeps every time.

    python benchmarks/sweep_fp8_gemm.py [--rows 2048 512] [--output_json out/fp8_gemm.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from kiln.kernels.gpu_timing import graph_us
from kiln.kernels.triton_fp8_quant import quantize_fp8_rows
from kiln.quant.fp8 import quantize_weight

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "up": (16384, 4096), "down": (4096, 16384)}  # (N, K)


def _scaled_mm(xq, xs, q, ws, fast: bool) -> torch.Tensor:
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=fast)


def cases(x, q, w_scale):
    """name -> call: every FP8 way to compute x @ W.T beside the quantization it needs."""
    xq_t, xs_t = quantize_fp8_rows(x, torch.tensor([x.abs().max().item() / 448], device=x.device))  # per tensor
    xq_r, xs_r = quantize_fp8_rows(x, None)  # per token
    ws_t, ws_r = w_scale.amax().reshape(()).float(), w_scale.float().reshape(1, -1)
    out = {"quantize (per token)": lambda: quantize_fp8_rows(x, None)}
    for fast in (False, True):
        out[f"_scaled_mm scalar fast={fast}"] = lambda f=fast: _scaled_mm(xq_t, xs_t.reshape(()), q, ws_t, f)
        out[f"_scaled_mm row-wise fast={fast}"] = lambda f=fast: _scaled_mm(xq_r, xs_r, q, ws_r, f)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", nargs="+", type=int, default=[2048])
    p.add_argument("--output_json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_fp8_gemm needs a CUDA GPU with FP8 tensor cores")
    dev = torch.device("cuda")
    results, totals = [], {}
    print("| layer | rows | way | us | TFLOP/s | x bf16 |\n|---|---|---|---|---|---|")
    for (name, (n, k)), rows in itertools.product(SHAPES.items(), args.rows):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        q, w_scale = quantize_weight(w, True, torch.float32)
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        times = {"bf16 F.linear": graph_us([lambda: F.linear(x, w)])}
        calls = cases(x, q, w_scale)
        for way, call in calls.items():
            try:
                times[way] = graph_us([call])
            except Exception as exc:  # noqa: BLE001 - a way that does not run here is reported, not fatal
                print(f"  {name} {way}: {type(exc).__name__}: {str(exc)[:150]}")
        for way, t in times.items():
            flops = 2 * rows * n * k / t / 1e6
            print(f"| {name} | {rows} | {way} | {t:.1f} | {flops:.0f} | {times['bf16 F.linear'] / t:.2f} |")
            totals[(rows, way)] = totals.get((rows, way), 0.0) + t
        results.append({"shape": name, "n": n, "k": k, "rows": rows, "us": times})
    print("\n| rows | way | four layers us | x bf16 |\n|---|---|---|---|")
    for (rows, way), t in sorted(totals.items()):
        print(f"| {rows} | {way} | {t:.1f} | {totals[(rows, 'bf16 F.linear')] / t:.2f} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
