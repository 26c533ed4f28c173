"""kiln.kernels.gpu_timing: how many weight copies a timing round reads (CPU), and on a GPU that graph replays time
the kernel, not its host launch."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import gpu_timing


def test_weight_copies_outgrow_twice_the_l2(monkeypatch):
    monkeypatch.setattr(gpu_timing, "l2_bytes", lambda device: 50 << 20)
    cpu = torch.device("cpu")
    assert gpu_timing.weight_copies(8 << 20, cpu) == 8  # 13 wanted, capped
    assert gpu_timing.weight_copies(34 << 20, cpu) == 3  # 3 x 34 MB >= 100 MB
    assert gpu_timing.weight_copies(300 << 20, cpu) == 1
    assert gpu_timing.weight_copies(0, cpu, most=4) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_time_the_kernel_not_the_launch():
    big = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    out = torch.empty_like(big)
    copy_us = gpu_timing.graph_us([lambda: out.copy_(big)])
    assert 0.5e12 < 2 * big.numel() / (copy_us * 1e-6) < 20e12  # a plausible HBM rate, bytes read + written
    small = torch.zeros(256, device="cuda")
    assert gpu_timing.graph_us([lambda: small.add_(1)]) < 4.0  # an eager launch alone costs the host more
    assert gpu_timing.weight_copies(1 << 30, torch.device("cuda")) == 1
