"""The weight-only matmul kernels against bf16 cuBLAS at MPT-7B's and Baichuan2-13B's layer shapes: median time per
call (L2 flushed by triton.testing.do_bench), speedup over bf16, and the HBM rate the quantized call reached (stored
bytes + scales + zeros / time). Random weights (the kernels' speed does not depend on the values); the kernels' default
launch configs (an engine's build tunes them per shape: kernels.weight_only).

    python benchmarks/bench_weight_only.py [--rows 1 16 32 2048] [--formats int8 int4 int4_g128]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing

from kiln.kernels.triton_weight_only import WeightOnlyFormat, weight_only_matmul

SHAPES = {"mpt7b qkv": (12288, 4096), "mpt7b out": (4096, 4096), "mpt7b up": (16384, 4096),
          "mpt7b down": (4096, 16384), "baichuan13b gate_up": (27392, 5120), "baichuan13b down": (5120, 13696)}
FORMATS = {"int8": WeightOnlyFormat(8), "int4": WeightOnlyFormat(4), "int4_g128": WeightOnlyFormat(4, 128)}


def quantized(fmt: WeightOnlyFormat, n: int, k: int):
    stored = torch.randint(-128, 128, (n, k * fmt.bits // 8), dtype=torch.int8, device="cuda")
    if fmt.group_size == 0:
        return stored, torch.rand(n, device="cuda", dtype=torch.bfloat16) * 0.01, None
    groups = -(-k // fmt.group_size)
    scale = torch.rand(n, groups, device="cuda", dtype=torch.bfloat16) * 0.01
    return stored, scale, torch.full_like(scale, 8.0)


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 2048])
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--tune", action="store_true", help="also time every build-tuning candidate at each shape and "
                   "print the fastest (what `kiln build` would pick)")
    args = p.parse_args()
    if args.tune:
        print_tuned(args.rows, args.formats)
        return
    print("| shape | rows | bf16 us | " + " | ".join(f"{f} us (x bf16, GB/s)" for f in args.formats) + " |")
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        weights = {f: quantized(FORMATS[f], n, k) for f in args.formats}
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            base = us(lambda: F.linear(x, w))
            cells = []
            for f in args.formats:
                stored, scale, zero = weights[f]
                t = us(lambda: weight_only_matmul(x, stored, scale, zero, None, FORMATS[f]))
                nbytes = stored.numel() + scale.numel() * 2 * (1 if zero is None else 2)
                cells.append(f"{t:.1f} ({base / t:.2f}x, {nbytes / t / 1e3:.0f})")
            print(f"| {label} {n}x{k} | {rows} | {base:.1f} | " + " | ".join(cells) + " |", flush=True)
        del w, weights


def print_tuned(rows_list: list[int], formats: list[str]) -> None:
    """The build's tuning candidates at each shape: the fastest config, its time, GB/s, and the default's time."""
    from kiln.kernels.triton_weight_only_configs import default_wo_config
    from kiln.kernels.triton_weight_only_tune import tune_shape

    from kiln.kernels import triton_common

    print("| shape | rows | format | bf16 us | default, plain dequant us | default us | tuned us (x bf16, GB/s) | "
          "tuned config | PTX vs plain max diff |")
    for label, (n, k) in SHAPES.items():
        for f in formats:
            fmt = FORMATS[f]
            stored, scale, zero = quantized(fmt, n, k)
            nbytes = stored.numel() + scale.numel() * 2 * (1 if zero is None else 2)
            for rows in rows_list:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                run = lambda: weight_only_matmul(x, stored, scale, zero, None, fmt)  # noqa: E731
                default = us(run)
                triton_common.ASM_DEQUANT = False
                plain, plain_out = us(run), run()
                triton_common.ASM_DEQUANT = True
                diff = (run().float() - plain_out.float()).abs().max().item()
                best, best_us, bf16_us = tune_shape((n, k, fmt.bits, fmt.group_size), rows, torch.bfloat16,
                                                    torch.device("cuda"))
                print(f"| {label} {n}x{k} | {rows} | {f} | {bf16_us:.1f} | {plain:.1f} | {default:.1f} | {best_us:.1f} "
                      f"({bf16_us / best_us:.2f}x, {nbytes / best_us / 1e3:.0f}) | {best} "
                      f"(default {default_wo_config(rows, fmt.bits, fmt.group_size, k)}) | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
