"""A/B of the split-K sum inside the weight-only kernels (last program per block) against the second reduce kernel:
the same configs timed both ways, eager (do_bench, L2 flushed) and as 16 launches replayed in one CUDA graph
(kiln.kernels.gpu_timing: the decode step's situation; one weight, so small layers may sit in L2; session 8 ran
32 launches), and the largest difference between the two results (0: the same bits). The session-8 H100 run of it
is in docs/performance.md.

    python benchmarks/ab_split_reduce.py"""
import torch
import triton.testing

from bench_weight_only import FORMATS, SHAPES, quantized
from kiln.kernels import triton_gemv
from kiln.kernels.gpu_timing import graph_us
from kiln.kernels.triton_weight_only import _launch_fused
from kiln.kernels.triton_weight_only_configs import WoConfig


def set_last(on: bool) -> None:
    triton_gemv.LAST_PROGRAM_REDUCES = on


configs = {"tc 64x128 auto": WoConfig(64, 128, 0, 4, 4), "gemv 32x128 split8": WoConfig(32, 128, 8, 4, 1, True),
           "gemv 64x128 auto": WoConfig(64, 128, 0, 4, 2, True)}
print("| layer | format | config | eager us last / kernel | graph us last / kernel | max diff |")
for label, (n, k) in SHAPES.items():
    for name in ("int4_g128", "int8"):
        fmt = FORMATS[name]
        stored, scale, zero = quantized(fmt, n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for cname, config in configs.items():
            fn = lambda: _launch_fused(x, stored, scale, zero, None, fmt, config)  # noqa: E731
            times, outs = [], []
            for on in (True, False):
                set_last(on)
                outs.append(fn().float())
                eager = triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median") * 1e3
                times.append((eager, graph_us([fn])))
            diff = (outs[0] - outs[1]).abs().max().item()
            (e_last, g_last), (e_kernel, g_kernel) = times
            print(f"| {label} | {name} | {cname} | {e_last:.1f} / {e_kernel:.1f} | {g_last:.1f} / {g_kernel:.1f} | "
                  f"{diff:.3g} |", flush=True)
set_last(True)
