"""SmoothQuant W8A8 on CUDA: torch._int_mm (padded for decode row counts) is exact against float64, and a bf16 layer
on the GPU matches the CPU path."""

from __future__ import annotations

import pytest
import torch

from kiln.quant.smoothquant import int8_matmul, quantize_weight, sq_linear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows", [1, 7, 16, 33, 512])
def test_int_mm_is_exact(rows):
    gen = torch.Generator().manual_seed(rows)
    qx = torch.randint(-127, 128, (rows, 4096), generator=gen, dtype=torch.int8)
    qw = torch.randint(-127, 128, (1024, 4096), generator=gen, dtype=torch.int8)
    want = qx.double() @ qw.double().t()
    got = int8_matmul(qx.cuda(), qw.cuda()).cpu().double()
    assert torch.equal(got, want.float().double())


@pytest.mark.parametrize("per_token", [True, False])
def test_bf16_layer_matches_cpu(per_token):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 256, generator=gen).to(torch.bfloat16)
    q, scale = quantize_weight(torch.randn(128, 256, generator=gen), True, torch.bfloat16)
    act = None if per_token else torch.tensor([4.0 / 127], dtype=torch.bfloat16)
    smoother = torch.rand(256, generator=gen).to(torch.bfloat16) + 0.5
    want = sq_linear(x, q, scale, act, smoother, None).float()
    cuda = [t if t is None else t.cuda() for t in (x, q, scale, act, smoother)]
    got = sq_linear(*cuda, None).cpu().float()
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)
