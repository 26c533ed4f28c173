"""The engine's host cost of admitting requests whose prompts are in the prefix cache: what a mixed step (new prompts
prefilled beside running decodes) costs besides the model, with and without prefix hits, with an empty cache and one
holding many cached blocks, at the engine's real block counts. On the CPU by default; on a GPU with --device cuda.

A tiny dummy engine (mpt-tiny, converted and built into a temporary directory unless --engine_dir names one) gets
a KV cache of --num_blocks blocks (an H100 MPT-7B engine has ~7500 of 16 tokens), then runs the workload of
benchmarks/bench_serve.py (--num_prompts prompts of ~input_len tokens, ~output_len outputs, greedy, ignore_eos) as
passes through the engine's add/step loop:

    fresh, empty cache    prompts set A on an empty cache: what LLM.generate measures offline
    repeat, prefix hits   set A again: every prompt's blocks but the last are cached (what a served pass after a
                          warm-up of the same prompts sees)
    fresh, full cache     set B: no hits, its blocks taken from a free list that holds set A's cached blocks
                          (unhashed ones first, then evicting the least recently freed)

Each pass prints engine.step_stats by kind, the block manager's hit rate, and the host time of the step's parts
(scheduling, block bookkeeping, input building, the model's forward, sampling, postprocessing) per kind, timed with
perf_counter around them. With --profile, a second repeat pass and a second fresh pass run under cProfile, only
their mixed steps kept, sorted by cumulative time. --arrival N adds the requests N per step (a served burst trickles
in) instead of all at once.

    .venv/bin/python benchmarks/bench_prefix_admission.py [--num_blocks 7500] [--profile] [--arrival 8]
    python benchmarks/bench_prefix_admission.py --device cuda --engine_dir E   # on a GPU: no server, no profiler

Measured (2-core CPU, OMP_NUM_THREADS=1, mpt-tiny with max_batch_size 64, 7,500 blocks of 16 tokens, 256 prompts of
64-192 tokens with 64-192 outputs, all at once): ms per mixed step outside the model's forward, for the passes fresh
on an empty cache / repeat with 93% of prompt tokens hit / fresh on a cache holding set A's 4,023 blocks (it
evicts from them):

    schedule 0.30 / 0.31 / 0.33, batch building 0.26 / 0.25 / 0.27, sampler launch 0.38 / 0.35 / 0.36,
    postprocess 0.16 / 0.15 / 0.17, resolve 0.18 / 0.16 / 0.18, the rest of step() 0.70 / 0.65 / 0.70

(the forward: 24.3 / 19.4 / 23.0 ms, the torch reference attention's per-sequence loop). Prefix hits, the hashing and
the eviction they imply add nothing measurable: about 2 ms of bookkeeping per mixed step whatever the cache holds
(tests/test_block_manager.py checks the operation counts). The step's host work beside the model's kernels does not
depend on how many of a prompt's tokens were cached either (the same launches for 14.6 or 231 prefill tokens); on a
GPU, what differs is the device work: see bench_serve.py's docstring for what made served mixed steps look slower.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kiln  # noqa: E402
import kiln.executor.model_runner as model_runner_module  # noqa: E402
from kiln.engine.sequence import Sequence  # noqa: E402

PARTS = ("schedule", "build_batch", "model", "sample", "postprocess", "resolve")


@contextlib.contextmanager
def tiny_engine(args: argparse.Namespace) -> Iterator[str]:
    """--engine_dir, or mpt-tiny converted and built (max_batch_size, 16-token blocks) in a temporary directory."""
    if args.engine_dir:
        yield args.engine_dir
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = [sys.executable, "-m", "kiln"]
        subprocess.run(run + ["convert", "--preset", "mpt-tiny", "--output_dir", f"{tmp}/ckpt"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(run + ["build", "--checkpoint_dir", f"{tmp}/ckpt", "--output_dir", f"{tmp}/engine",
                              "--max_batch_size", str(args.max_batch_size), "--max_seq_len", "512",
                              "--max_input_len", "256"], check=True, stdout=subprocess.DEVNULL)
        yield f"{tmp}/engine"


def workload(n: int, input_len: int, output_len: int, ratio: float, vocab: int,
             seed: int) -> list[tuple[list[int], int]]:
    """(prompt, output length) as bench_serve.py draws them (ids from the whole vocabulary: a tiny one)."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - ratio)), int(mean * (1 + ratio))))

    return [([rng.randrange(vocab) for _ in range(length(input_len))], length(output_len)) for _ in range(n)]


class PartTimer:
    """perf_counter totals of parts of step(), by the kind of step the call was counted as."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.current[part] += time.perf_counter() - t
        return timed

    def end_call(self, kind: str) -> None:
        for part, seconds in self.current.items():
            self.by_kind[kind][part] += seconds
        self.current.clear()


def instrument(llm: Any, timer: PartTimer) -> None:
    """Time the parts of a step: the scheduler's schedule and postprocess, batch building, the model's forward,
    the sampler's launch, and the resolution of the step in flight (settle + events)."""
    engine, runner = llm.engine, llm.runner
    scheduler = engine.scheduler
    scheduler.schedule = timer.wrap("schedule", scheduler.schedule)
    scheduler.postprocess_ahead = timer.wrap("postprocess", scheduler.postprocess_ahead)
    scheduler.postprocess = timer.wrap("postprocess", scheduler.postprocess)
    model_runner_module.build_host_batch = timer.wrap("build_batch", model_runner_module.build_host_batch)
    runner.model.forward = timer.wrap("model", runner.model.forward)
    runner.sampler.launch = timer.wrap("sample", runner.sampler.launch)
    engine._resolve = timer.wrap("resolve", engine._resolve)


def kind_of_last_call(stats: Any, before: dict[str, int]) -> str:
    for kind, k in stats.kinds.items():
        if k.steps != before[kind]:
            return kind
    return "idle"


def run_pass(llm: Any, work: list[tuple[list[int], int]], timer: PartTimer, arrival: int,
             profile_kind: str | None = None) -> tuple[float, pstats.Stats | None]:
    """All requests through the engine's add/step loop (`arrival` per step, 0: all at once); returns the wall time
    and, with `profile_kind`, the cProfile stats of the calls of that kind."""
    engine = llm.engine
    params = [kiln.SamplingParams(max_tokens=out, temperature=0, ignore_eos=True) for _, out in work]
    pending = [Sequence(engine.new_seq_id(), p, sp.max_tokens, frozenset(), True, 0, sp)
               for (p, _), sp in zip(work, params)]
    pending.reverse()
    engine.step_stats.reset()
    timer.by_kind.clear()
    stats = engine.step_stats
    profiled: pstats.Stats | None = None
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        for _ in range(arrival or len(pending)):
            if pending:
                engine.add(pending.pop())
        before = {kind: k.steps for kind, k in stats.kinds.items()}
        prof = cProfile.Profile() if profile_kind else None
        if prof is not None:
            prof.enable()
        engine.step()
        if prof is not None:
            prof.disable()
        kind = kind_of_last_call(stats, before)
        timer.end_call(kind)
        if prof is not None and kind == profile_kind:
            if profiled is None:
                profiled = pstats.Stats(prof)
            else:
                profiled.add(prof)
    return time.perf_counter() - start, profiled


def report(name: str, llm: Any, wall: float, timer: PartTimer, hits: tuple[int, int]) -> None:
    bm = llm.engine.scheduler.block_manager
    summary = llm.engine.step_stats.summary()
    hit_tokens, query_tokens = hits
    print(f"\n== {name}: wall {wall:.2f} s, prefix hits {hit_tokens}/{query_tokens} tokens "
          f"({hit_tokens / max(query_tokens, 1):.0%}), cached blocks {bm.num_cached_blocks}, "
          f"free {bm.num_free_blocks}/{bm.num_blocks}, preemptions {llm.engine.scheduler.num_preemptions}")
    print(f"{'kind':13s} {'steps':>6s} {'ms/step':>8s} {'seqs/st':>8s} {'pf tok/st':>9s} | ms/step in: "
          + " ".join(f"{p:>11s}" for p in PARTS) + f" {'other':>8s}")
    for kind, k in summary["kinds"].items():
        if not k["steps"]:
            continue
        n = k["steps"]
        parts = timer.by_kind.get(kind, {})
        other = k["seconds"] - sum(parts.values())
        print(f"{kind:13s} {n:6d} {1000 * k['seconds'] / n:8.3f} {k['seqs'] / n:8.1f} {k['prefill_tokens'] / n:9.1f} |"
              f"             " + " ".join(f"{1000 * parts.get(p, 0.0) / n:11.3f}" for p in PARTS)
              + f" {1000 * other / n:8.3f}")
    print(f"between steps {summary['between_seconds']:.3f} s")


def print_profile(name: str, profiled: pstats.Stats | None, top: int) -> None:
    if profiled is None:
        print(f"\n(no mixed step in {name})")
        return
    out = io.StringIO()
    profiled.stream = out
    profiled.sort_stats("cumulative").print_stats(top)
    print(f"\n== cProfile of the mixed steps of {name} (cumulative)\n" + out.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine_dir", default=None, help="an engine to run (default: mpt-tiny built here)")
    p.add_argument("--max_batch_size", type=int, default=64, help="of the engine built here")
    p.add_argument("--num_blocks", type=int, default=None, help="KV-cache blocks (default: 7500 on the CPU, as an "
                   "H100 MPT-7B engine has; on a GPU what its memory allows)")
    p.add_argument("--device", default="cpu", help="cpu (default), or cuda with an --engine_dir: the same passes on "
                   "the GPU, where the parts' times are host launch times and the waits fall in resolve")
    p.add_argument("--num_prompts", type=int, default=256)
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=128)
    p.add_argument("--range_ratio", type=float, default=0.5)
    p.add_argument("--arrival", type=int, default=0, help="requests added per step (0: all at once)")
    p.add_argument("--no_prefix_caching", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile the mixed steps of a repeat and a fresh pass")
    p.add_argument("--top", type=int, default=45, help="rows of each profile")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tiny_engine(args) as engine_dir:
        if args.device == "cpu":  # a cache of exactly --num_blocks (default 7500)
            probe = kiln.LLM(engine_dir, device="cpu", kv_cache_bytes=1 << 20)
            per_block = probe.runner.plan.kv_bytes_per_token * probe.build.kv_block_size
            probe.close()
            llm = kiln.LLM(engine_dir, device="cpu", kv_cache_bytes=(args.num_blocks or 7500) * per_block,
                           enable_prefix_caching=not args.no_prefix_caching)
        else:  # what the GPU's memory allows, at most --num_blocks
            block_size = json.loads((Path(engine_dir) / "config.json").read_text())["build"]["kv_block_size"]
            llm = kiln.LLM(engine_dir, device=args.device, enable_prefix_caching=not args.no_prefix_caching,
                           kv_cache_max_tokens=args.num_blocks * block_size if args.num_blocks else None)
        vocab = llm.info.model.vocab_size
        print(f"engine: {llm.info.model.num_hidden_layers} layers, max_batch_size {llm.build.max_batch_size}, "
              f"block_size {llm.build.kv_block_size}, {llm.runner.num_blocks} KV blocks, "
              f"max_num_tokens {llm.build.max_num_tokens}, async scheduling {llm.engine.async_scheduling}")
        timer = PartTimer()
        instrument(llm, timer)
        bm = llm.engine.scheduler.block_manager

        def one(name: str, seed: int, profile: bool = False) -> None:
            work = workload(args.num_prompts, args.input_len, args.output_len, args.range_ratio, vocab, seed)
            h0, q0 = bm.num_prefix_hit_tokens, bm.num_prefix_query_tokens
            wall, profiled = run_pass(llm, work, timer, args.arrival, "mixed" if profile else None)
            report(name, llm, wall, timer, (bm.num_prefix_hit_tokens - h0, bm.num_prefix_query_tokens - q0))
            if profile:
                print_profile(name, profiled, args.top)

        if llm.device.type == "cuda":  # every prefill tile compiled first, as kiln serve does before it is ready
            from kiln.engine.warmup import warm_up

            warm_up(llm)
        # A short warm-up (allocator, first shapes) on prompts of their own.
        run_pass(llm, workload(8, args.input_len, 8, args.range_ratio, vocab, args.seed + 100), timer, 0)
        one("fresh, empty cache (set A)", args.seed)
        one("repeat, prefix hits (set A again)", args.seed)
        one("fresh, full cache (set B)", args.seed + 1)
        if args.profile:
            one("repeat, prefix hits (set A, profiled)", args.seed, profile=True)
            one("fresh, full cache (set C, profiled)", args.seed + 2, profile=True)
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
