"""Sweep of SmoothQuant's INT8 GEMM (kiln.kernels.triton_smoothquant.int8_gemm) launch configs at MPT-7B's layer
shapes, beside bf16 cuBLAS (F.linear) of the same shape: every config of candidate_int8_configs at M = 1, 16 (decode)
and 2048 (prefill), timed as a decode step's CUDA graph runs them (kiln.kernels.gpu_timing.graph_us, each call on
its own copy of the weight, so that a round of calls misses L2). Prints one row per config (us, GB/s of the bytes a
call must move, TFLOP/s, speedup over bf16, whether its bits equal the default config's and the torch reference's),
the best config per (M, shape), and per M the four layers' sum (one transformer block's GEMMs); writes every number
to --output_json.

    PYTHONPATH=. python benchmarks/sweep_int8_gemm.py --output_json sweep_int8_gemm.json [--rows 1 16 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from kiln.kernels.gpu_timing import graph_us, weight_copies
from kiln.kernels.triton_common import split_counters
from kiln.kernels.triton_smoothquant import int8_gemm
from kiln.kernels.triton_smoothquant_configs import candidate_int8_configs, default_int8_config
from kiln.quant.sq_math import int8_matmul

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "up": (16384, 4096), "down": (4096, 16384)}  # (N, K)
ROWS = (1, 16, 2048)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_json", required=True, help="where to write every timing (JSON)")
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="M values (rows of x)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="MPT-7B layers")
    return p.parse_args(argv)


def _inputs(m: int, n: int, k: int, copies: int, device: torch.device):
    """Random int8 x [M, K] with per-token scales [M, 1] fp32, `copies` int8 weights [N, K] with bf16 per-channel
    scales [N] (the layout convert writes)."""
    qx = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    a_scale = torch.rand(m, 1, device=device) / 100
    weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device) for _ in range(copies)]
    w_scale = (torch.rand(n, device=device) / 100).to(torch.bfloat16)
    return qx, a_scale, weights, w_scale


def _bf16_us(m: int, n: int, k: int, device: torch.device) -> float:
    """bf16 F.linear of the same shape, each call on its own weight copy."""
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(weight_copies(2 * n * k, device))]
    return graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in weights])


def sweep_shape(label: str, m: int, n: int, k: int, sms: int, device: torch.device) -> list[dict]:
    """One row (dict) per candidate config at (M, N, K), after the bf16 row; the default config first."""
    bf16_us = _bf16_us(m, n, k, device)
    qx, a_scale, weights, w_scale = _inputs(m, n, k, weight_copies(n * k, device), device)
    default = default_int8_config(m, n, k, sms)
    want = int8_gemm(qx, a_scale, weights[0], w_scale, None, torch.bfloat16, config=default)
    reference = (int8_matmul(qx, weights[0]) * a_scale * w_scale.float()).to(torch.bfloat16)  # sq_linear's epilogue
    moved = n * k + m * k + 2 * m * n + 2 * n + 4 * m  # bytes a call must move: int8 weight and x, bf16 y, scales
    rows = [{"shape": label, "n": n, "k": k, "m": m, "config": "bf16 F.linear", "us": bf16_us,
             "gbps": (2 * n * k + 2 * m * k + 2 * m * n) / bf16_us / 1e3, "tflops": 2 * m * n * k / bf16_us / 1e6,
             "x_bf16": 1.0}]
    for config in candidate_int8_configs(m, n, k, sms):
        row = {"shape": label, "n": n, "k": k, "m": m, "config": str(config), "params": asdict(config),
               "default": config == default}
        try:
            got = int8_gemm(qx, a_scale, weights[0], w_scale, None, torch.bfloat16, config=config)
            row["same_bits"] = bool(torch.equal(got, want))
            row["equals_reference"] = bool(torch.equal(got, reference))
            us = graph_us([lambda w=w, c=config: int8_gemm(qx, a_scale, w, w_scale, None, torch.bfloat16, config=c)
                           for w in weights])
        except Exception as err:  # noqa: BLE001 - a config that fails to compile or launch is reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}"
            rows.append(row)
            continue
        row.update(us=us, gbps=moved / us / 1e3, tflops=2 * m * n * k / us / 1e6, x_bf16=bf16_us / us)
        rows.append(row)
    return rows


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"| {row['shape']} | {row['m']} | {row['config']} | failed: {row['error']} |||||")
        return
    bits = ""
    if "same_bits" in row:  # against the default config's output, and the torch reference's
        bits = " ".join(word for word, ok in (("DEFAULT-DIFFERS", row["same_bits"]),
                                               ("REFERENCE-DIFFERS", row["equals_reference"])) if not ok) or "same"
    star = " (default)" if row.get("default") else ""
    print(f"| {row['shape']} | {row['m']} | {row['config']}{star} | {row['us']:.1f} | {row['gbps']:.0f} | "
          f"{row['tflops']:.1f} | {row['x_bf16']:.2f} | {bits} |", flush=True)


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The best int8 config per (M, shape), and per M the sums over the shapes (one block's GEMMs) of bf16, the
    default config and the best configs."""
    best, totals = [], []
    for m in dict.fromkeys(r["m"] for r in rows):
        sums = {"m": m, "bf16_us": 0.0, "default_us": 0.0, "best_us": 0.0}
        for shape in dict.fromkeys(r["shape"] for r in rows if r["m"] == m):
            cases = [r for r in rows if r["m"] == m and r["shape"] == shape and "us" in r]
            bf16 = next(r for r in cases if "params" not in r)
            timed = [r for r in cases if "params" in r and r["same_bits"]]
            if not timed:
                continue
            top = min(timed, key=lambda r: r["us"])
            default = next((r for r in timed if r["default"]), top)
            best.append({"m": m, "shape": shape, "config": top["config"], "params": top["params"], "us": top["us"],
                         "x_bf16": top["x_bf16"], "default_us": default["us"], "bf16_us": bf16["us"]})
            sums["bf16_us"] += bf16["us"]
            sums["default_us"] += default["us"]
            sums["best_us"] += top["us"]
        totals.append(sums)
    return best, totals


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_int8_gemm: no CUDA device; this sweep times GPU kernels (run it on an H100)", file=sys.stderr)
        return 2
    import triton

    start = time.perf_counter()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split_counters(device)  # before any graph capture: the split-K launches need them
    print(f"{torch.cuda.get_device_name(device)}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | M | config | us | GB/s | TFLOP/s | x bf16 | bits (vs default config, torch reference) |")
    print("|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    for m in args.rows:
        for label in args.shapes:
            n, k = SHAPES[label]
            for row in sweep_shape(label, m, n, k, sms, device):
                _print_row(row)
                rows.append(row)
    best, totals = summarize(rows)
    print("\n| M | shape | best config | us | x bf16 | default us | bf16 us |")
    print("|---|---|---|---|---|---|---|")
    for b in best:
        print(f"| {b['m']} | {b['shape']} | {b['config']} | {b['us']:.1f} | {b['x_bf16']:.2f} | {b['default_us']:.1f} "
              f"| {b['bf16_us']:.1f} |")
    print("\n| M | bf16 us (4 GEMMs) | default int8 us | best int8 us | best x bf16 |")
    print("|---|---|---|---|---|")
    for t in totals:
        print(f"| {t['m']} | {t['bf16_us']:.1f} | {t['default_us']:.1f} | {t['best_us']:.1f} | "
              f"{t['bf16_us'] / max(t['best_us'], 1e-9):.2f} |")
    differ = [r for r in rows if "params" in r and not (r.get("same_bits") and r.get("equals_reference", False))
              and "error" not in r]
    elapsed = time.perf_counter() - start
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; configs whose bits differ from the default's or the reference's: "
          f"{len(differ)}")
    with open(args.output_json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "sms": sms, "torch": torch.__version__,
                   "triton": triton.__version__, "seconds": elapsed, "rows": rows, "best": best, "totals": totals},
                  f, indent=1)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
