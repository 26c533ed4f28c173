"""Timing kernels as a decode step runs them: launched from a CUDA graph, weights cold in L2.

Why not triton.testing.do_bench: it times each call between two events on the host's schedule, so a call whose host
launch (Python checks, the Triton launcher: 20-60 us) outlasts its kernel (10-30 us for a quantized decode layer)
is timed at the host's speed. An H100 run of the weight-only kernels measured 31 us eagerly for a layer that took
9.7 us replayed in a graph, and the build's tuning picked its tiles on those host-bound numbers. kiln's decode steps
replay CUDA graphs, where the host launch costs nothing per kernel; this module times the same way: the calls
captured back to back in one graph, replayed, GPU time per call. Each call should read its own copy of the weights
(`weight_copies` says how many make a round of calls outgrow L2), so that each finds its weight in HBM as one decode
step finds each layer's.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

import torch

_REPLAYS = 7
_MIN_CALLS = 16  # per replay: the graph's launch gaps are spread over many calls


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size (50 MB on an H100 when torch does not say)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20)


def weight_copies(nbytes: int, device: torch.device, most: int = 8) -> int:
    """How many copies of an `nbytes` weight make a round of calls read at least twice the L2 (1..most)."""
    return max(1, min(most, -(-2 * l2_bytes(device) // max(1, nbytes))))


def graph_us(calls: Sequence[Callable[[], Any]]) -> float:
    """Median GPU time in microseconds per call of `calls` (each a kernel launch or a few), run back to back in one
    CUDA graph (repeated in order until at least _MIN_CALLS), over _REPLAYS replays. Each call runs once on a side
    stream first, outside the capture: compilation, first allocations and launch errors happen there."""
    rounds = -(-_MIN_CALLS // len(calls))
    order = list(calls) * rounds
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in order:
            call()
    graph.replay()
    times = []
    for _ in range(_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(order))
    del graph
    return statistics.median(times)
