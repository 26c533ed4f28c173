"""A/B of the split-K sum inside the weight-only kernels (last program per block) against the second reduce kernel:
the same configs timed both ways, eager (do_bench, L2 flushed) and as 32 layers' worth of launches replayed in one
CUDA graph (the decode step's situation). python benchmarks/ab_split_reduce.py"""
import torch
import triton.testing

from bench_weight_only import FORMATS, SHAPES, quantized
from kiln.kernels import triton_weight_only, triton_weight_only_gemv
from kiln.kernels.triton_weight_only import _launch_fused
from kiln.kernels.triton_weight_only_configs import WoConfig


def set_last(on: bool) -> None:
    triton_weight_only.LAST_PROGRAM_REDUCES = on
    triton_weight_only_gemv.LAST_PROGRAM_REDUCES = on


def graph_us(fn, reps=32) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


configs = {"tc 64x128 auto": WoConfig(64, 128, 0, 4, 4), "gemv 32x128 split8": WoConfig(32, 128, 8, 4, 1, True),
           "gemv 64x128 auto": WoConfig(64, 128, 0, 4, 2, True)}
print("| layer | format | config | eager us last / kernel | graph us last / kernel | max diff |")
for label, (n, k) in SHAPES.items():
    for name in ("int4_g128", "int8"):
        fmt = FORMATS[name]
        stored, scale, zero = quantized(fmt, n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for cname, config in configs.items():
            if fmt.bits == 8:
                config = WoConfig(config.block_n, config.block_k, config.split_k, config.num_warps, config.num_stages, config.gemv)
            fn = lambda: _launch_fused(x, stored, scale, zero, None, fmt, config)  # noqa: E731
            row = []
            outs = []
            for on in (True, False):
                set_last(on)
                outs.append(fn().float())
                row.append((triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median") * 1e3, graph_us(fn)))
            diff = (outs[0] - outs[1]).abs().max().item()
            print(f"| {label} | {name} | {cname} | {row[0][0]:.1f} / {row[1][0]:.1f} | {row[0][1]:.1f} / {row[1][1]:.1f} | {diff:.3g} |", flush=True)
set_last(True)
