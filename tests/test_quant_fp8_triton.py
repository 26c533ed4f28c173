"""The Triton FP8 GEMV (kiln/kernels/triton_fp8_gemv.py) against fake-quantized x @ dequantized W.T through Triton's
interpreter on the CPU (odd shapes, per tensor and per channel, bias on and off) and its input checks."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

import pytest  # noqa: E402
from interpreted_triton import interpret_triton  # noqa: E402

if INTERPRET:
    interpret_triton(("kiln.kernels.triton_jit_common", "kiln.kernels.triton_fp8_gemv"))

from kiln.kernels.triton_fp8_gemv import fp8_gemv  # noqa: E402
from kiln.quant.fp8 import fake_quantize_activation, quantize_weight  # noqa: E402


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rows, n, k, bias", [(1, 37, 70, False), (3, 64, 130, True), (16, 5, 256, True)])
def test_matches_fake_quantized_reference(per_channel, rows, n, k, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    q, scale = quantize_weight(torch.randn(n, k, generator=gen), per_channel, torch.float32)
    xq = fake_quantize_activation(torch.randn(rows, k, generator=gen), None)
    b = torch.randn(n, generator=gen) if bias else None
    got = fp8_gemv(xq.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), None if b is None else b.to(DEVICE))
    want = xq.double() @ (q.double() * scale.double().reshape(-1, 1)).T + (0 if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_say_what_was_wrong():
    q, scale = quantize_weight(torch.randn(8, 16), False, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        fp8_gemv(torch.randn(2, 16), q.float(), scale, None)
    with pytest.raises(ValueError, match="at most 16 rows"):
        fp8_gemv(torch.randn(17, 16), q, scale, None)
    with pytest.raises(ValueError, match="1 or 8 values"):
        fp8_gemv(torch.randn(2, 16), q, torch.ones(3), None)
