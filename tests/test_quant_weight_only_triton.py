"""The Triton weight-only GEMV (kiln/kernels/triton_weight_only.py) against `x @ dequant(W).T` through Triton's
interpreter on the CPU (odd shapes, INT8 and INT4, bias on and off) and its input checks."""

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
    interpret_triton(("kiln.kernels.triton_jit_common", "kiln.kernels.triton_gemv_kernels",
                      "kiln.kernels.triton_gemv",
                      "kiln.kernels.triton_weight_only_kernels", "kiln.kernels.triton_weight_only"))

from kiln.kernels.triton_weight_only import weight_only_linear  # noqa: E402
from kiln.quant.weight_only import pack_int4, quantize_per_channel  # noqa: E402


def quantized(n: int, k: int, bits: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random weight's stored form, scale, and its dequantized values written out here (q * scale, float64)."""
    q, scale = quantize_per_channel(torch.randn(n, k, generator=gen), bits, torch.float32)
    return (pack_int4(q) if bits == 4 else q), scale, q.double() * scale.double()[:, None]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows, n, k, bias", [(1, 37, 70, False), (3, 64, 130, True), (16, 5, 2, True)])
def test_matches_x_times_dequantized_weight(bits, rows, n, k, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    weight, scale, dense = quantized(n, k, bits, gen)
    x = torch.randn(rows, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    got = weight_only_linear(x.to(DEVICE), weight.to(DEVICE), scale.to(DEVICE), None if b is None else b.to(DEVICE),
                             bits)
    want = x.double() @ dense.T + (0 if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_say_what_was_wrong():
    gen = torch.Generator().manual_seed(0)
    weight, scale, _ = quantized(8, 16, 4, gen)
    x = torch.randn(2, 16, generator=gen)
    with pytest.raises(ValueError, match="holds 16"):
        weight_only_linear(x[:, :8], weight, scale, None, 4)
    with pytest.raises(ValueError, match="int8 weight"):
        weight_only_linear(x, weight.float(), scale, None, 4)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        weight_only_linear(x, weight, scale, None, 3)
    with pytest.raises(ValueError, match=r"scale and bias must be \[N\]"):
        weight_only_linear(x, weight, scale[:4], None, 4)
    with pytest.raises(ValueError, match="contiguous along K"):
        weight_only_linear(torch.randn(16, 2).t(), weight, scale, None, 4)
