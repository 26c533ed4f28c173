"""kiln.executor.pinned on a GPU: after reserve_pinned_blocks, the small host->device copies a step makes while the
device is still busy with earlier ones reuse PyTorch's cached pinned blocks instead of allocating page-locked memory
(an allocation CUDA synchronizes the device for, which would make a launch wait)."""

from __future__ import annotations

import pytest
import torch

from kiln.executor.pinned import reserve_pinned_blocks
from kiln.sampling import to_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_copies_behind_a_busy_device_allocate_no_pinned_memory():
    device = torch.device("cuda")
    torch.cuda.init()  # host_memory_stats() is {} until CUDA is initialized (pinning alone does not)
    assert reserve_pinned_blocks(device) >= 8 * (1 << 20)
    allocs = torch.cuda.host_memory_stats()["num_host_alloc"]
    torch.cuda._sleep(50_000_000)  # ~25 ms: every copy below is still pending when the next one is queued
    outs = [to_device(torch.arange(n, dtype=torch.int64), device) for n in (3, 17, 64, 200, 1000) for _ in range(4)]
    assert torch.cuda.host_memory_stats()["num_host_alloc"] == allocs
    torch.cuda.synchronize()
    assert outs[-1].cpu().tolist() == list(range(1000))

