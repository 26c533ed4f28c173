"""Filling PyTorch's pinned host memory cache before the first step, so that launching a step never allocates it.

Every step copies small tensors between host and device through pinned memory (kiln.sampling.to_device and the
copies of sampled tokens to the host). PyTorch's caching host allocator reuses a pinned block once the copies that
used it have run, and otherwise allocates a new one, and a page-locked allocation is one of the operations CUDA
synchronizes the device for (CUDA programming guide, "Implicit Synchronization"). With async scheduling one or two
steps are in flight, so blocks are still pending when the next launch wants one: on a GPU the launch of a step could
wait for the device exactly where it must not (tests/test_async_scheduling_gpu.py). Allocating and dropping a few
blocks of every size class up front leaves them in the cache for the steps to reuse.
"""

from __future__ import annotations

import torch

# Size classes the per-step copies use (the allocator rounds a request up to a power of two, with no minimum): 1 B to
# 1 MiB, enough for the sampled ids, logprobs, ranks, sampling parameters, bans and feeds of a batch (one sequence's
# id is 8 bytes, three are 24: an H100 run that started at 64 B allocated a 32 B block for them). Larger copies (a
# seeded row's noise over the vocabulary, top logprobs, return_logits) come with features that wait for the host anyway.
SMALLEST_CLASS, LARGEST_CLASS = 0, 20
BLOCKS_PER_CLASS = 8  # steps in flight (2) times the copies of one size a step makes, with room to spare


def reserve_pinned_blocks(device: torch.device) -> int:
    """Allocate and free BLOCKS_PER_CLASS pinned blocks of each size class (CUDA only); returns the bytes now held in
    PyTorch's pinned cache for the steps (about 16 MiB), 0 elsewhere."""
    if device.type != "cuda":
        return 0
    blocks = [torch.empty(1 << bits, dtype=torch.uint8, pin_memory=True)
              for bits in range(SMALLEST_CLASS, LARGEST_CLASS + 1) for _ in range(BLOCKS_PER_CLASS)]
    held = sum(block.numel() for block in blocks)
    del blocks  # back to the allocator's cache (never unpinned while the process lives)
    return held
