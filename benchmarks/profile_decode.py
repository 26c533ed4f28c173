"""Where a decode step's time goes: torch.profiler (CPU + CUDA activity) over engine steps of a dummy engine, a
kernel-time table per step, GPU-busy vs wall time per step, a cProfile of the host side, and the GEMM shapes of
the model timed alone inside a CUDA graph against the copy bandwidth.

    python3 benchmarks/profile_decode.py --preset mpt-7b --batch_size 1 32
    python3 benchmarks/profile_decode.py --preset dbrx --num_layers 4 --batch_size 1 32
    python3 benchmarks/profile_decode.py --preset mpt-7b --batch_size 48 --mixed 16 --no_tune
      (--mixed N: N new prompts join the running batch; profiles the mixed prefill + decode steps that follow,
      the eager steps that decide serving throughput)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln.bench.dummy import dummy_engine  # noqa: E402
from kiln.bench.options import BenchOptions  # noqa: E402
from kiln.bench.physics import copy_bandwidth_gbs  # noqa: E402
from kiln.bench.timing import _add, random_prompts  # noqa: E402


def _step_until_decode(llm, batch: int, input_len: int, output_len: int, seed: int) -> None:
    _add(llm, random_prompts(batch, input_len, llm.info.model.vocab_size, seed), output_len)
    first = 0
    while first < batch:
        first += len(llm.engine.step())
    for _ in range(3):  # a few decode steps: everything warm
        llm.engine.step()
    torch.cuda.synchronize()


def _category(name: str) -> str:
    lower = name.lower()
    for key, label in (("gemv", "gemm"), ("gemm", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"), ("nvjet", "gemm"),
                       ("splitk", "gemm"), ("paged_attention", "attention"), ("attn", "attention"),
                       ("reduce_segments", "attention"), ("kv_cache", "kv write"), ("moe", "moe"),
                       ("layer_norm", "norm"), ("norm", "norm"), ("gelu", "activation"), ("silu", "activation"),
                       ("softmax", "sampler/router"), ("topk", "sampler/router"), ("argmax", "sampler/router"),
                       ("reduce", "reductions"), ("copy", "copy"), ("elementwise", "elementwise"),
                       ("memcpy", "memcpy"), ("memset", "memset")):
        if key in lower:
            return label
    return "other"


def profile_steps(llm, steps: int) -> None:
    """torch.profiler over `steps` engine steps: kernel table, categories and GPU busy time per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps * 1e3
    kernels: dict[str, list[float]] = defaultdict(list)
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            dur = ev.time_range.elapsed_us()
            kernels[ev.name].append(dur)
            spans.append((ev.time_range.start, ev.time_range.end))
    spans.sort()
    busy, end = 0.0, -1.0
    short_gaps, long_gaps = [], []  # idle time between kernels: < 10 us (launch gaps inside a graph) or longer
    for s, e in spans:  # union of kernel intervals
        if end >= 0 and s > end:
            (short_gaps if s - end < 10 else long_gaps).append(s - end)
        if e > end:
            busy += e - max(s, end)
            end = e
    total = sum(sum(v) for v in kernels.values())
    print(f"  wall {wall:.3f} ms/step; GPU busy {busy / steps / 1e3:.3f} ms/step; kernel sum "
          f"{total / steps / 1e3:.3f} ms/step; kernels/step {sum(len(v) for v in kernels.values()) / steps:.0f}")
    print(f"  idle between kernels: {sum(short_gaps) / steps / 1e3:.3f} ms/step in {len(short_gaps) / steps:.0f} "
          f"gaps under 10 us (launch latency), {sum(long_gaps) / steps / 1e3:.3f} ms/step in "
          f"{len(long_gaps) / steps:.1f} longer gaps (host work the GPU waits for)")
    cats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, durs in kernels.items():
        c = cats[_category(name)]
        c[0] += sum(durs)
        c[1] += len(durs)
    for label, (us, n) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        print(f"  {label:16s} {us / steps / 1e3:8.3f} ms/step {n / steps:6.0f} launches {100 * us / total:5.1f}%")
    print("  top kernels (per step: ms, count, mean us):")
    for name, durs in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:18]:
        print(f"    {sum(durs) / steps / 1e3:7.3f} {len(durs) / steps:5.0f} {sum(durs) / len(durs):8.2f}  {name[:110]}")


def mixed_steps(llm, new: int, input_len: int, seed: int) -> int:
    """Add `new` prompts beside the running decodes; the number of steps until all of them have their first token
    (each one a mixed prefill + decode step, as chunked prefill packs them)."""
    _add(llm, random_prompts(new, input_len, llm.info.model.vocab_size, seed), 40)
    return max(1, -(-new * input_len // llm.build.max_num_tokens))


def host_profile(llm, steps: int) -> None:
    """cProfile of engine steps: the host functions that cost the most (cumulative)."""
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(steps):
        llm.engine.step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(12)
    stats.sort_stats("cumulative").print_stats("kiln/", 16)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip() and "ncalls" not in ln]
    print("  host (cProfile over %d steps: top tottime, then kiln's functions by cumulative time):" % steps)
    for ln in lines:
        if not ln.lstrip().startswith(("Ordered", "List reduced", "function calls")):
            print("    " + ln[:150])


def graph_ms(fn, reps: int = 10) -> float:
    """Time of one call of `fn` replayed inside a CUDA graph (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / reps * 1e3


def gemm_table(llm, batches: list[int], bandwidth: float) -> None:
    """Each distinct Linear weight of the model alone, at each batch, as a fraction of the copy bandwidth."""
    shapes = {}
    for name, mod in llm.runner.model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) or (w is not None and w.dim() == 2 and "embed" not in name
                                                 and "norm" not in name):
            shapes.setdefault(tuple(w.shape), (name, w))
    for shape, (name, w) in shapes.items():
        for b in batches:
            x = torch.randn(b, shape[1], dtype=w.dtype, device=w.device)
            ms = graph_ms(lambda: torch.nn.functional.linear(x, w))
            gbs = w.numel() * w.element_size() / ms / 1e6
            print(f"  linear {name.split('.')[-1]:14s} {str(shape):16s} M={b:3d}: {ms * 1e3:8.1f} us "
                  f"{gbs:7.0f} GB/s = {100 * gbs / bandwidth:5.1f}% of copy")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", required=True)
    p.add_argument("--num_layers", type=int)
    p.add_argument("--batch_size", type=int, nargs="+", default=[1, 32])
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--no_tune", action="store_true")
    p.add_argument("--gemms", action="store_true")
    p.add_argument("--mixed", type=int, default=0, help="profile the steps after this many new prompts join")
    args = p.parse_args()
    import kiln

    opts = BenchOptions(preset=args.preset, num_layers=args.num_layers, dtype="bfloat16",
                        batch_sizes=[*args.batch_size, max(args.batch_size) + args.mixed], input_len=args.input_len,
                        output_len=64, tune=not args.no_tune)
    bandwidth = copy_bandwidth_gbs(torch.device("cuda"))
    print(f"== {args.preset} layers={args.num_layers} copy bandwidth {bandwidth:.0f} GB/s")
    with dummy_engine(opts, log=lambda s: None) as engine_dir:
        llm = kiln.LLM(engine_dir, device="cuda", kv_cache_free_gpu_memory_fraction=0.5, enable_prefix_caching=False)
        for b in args.batch_size:
            _step_until_decode(llm, b, args.input_len, 40, b)
            print(f"-- batch {b}")
            profile_steps(llm, 10)
            host_profile(llm, 10)
            if args.mixed:
                steps = mixed_steps(llm, args.mixed, args.input_len, b + 1)
                print(f"-- batch {b} + {args.mixed} new prompts of {args.input_len}: {steps} mixed steps")
                profile_steps(llm, steps)
                steps = mixed_steps(llm, args.mixed, args.input_len, b + 2)
                host_profile(llm, steps)
            while llm.engine.has_unfinished():
                llm.engine.step()
        if args.gemms:
            gemm_table(llm, args.batch_size, bandwidth)
        llm.close()


if __name__ == "__main__":
    main()
