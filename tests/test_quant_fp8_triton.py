"""The Triton FP8 kernels through Triton's interpreter on the CPU: the one-pass activation quantization
(kiln/kernels/triton_fp8_quant.py) bit for bit against kiln.quant.fp8's torch quantization, including ties, subnormals,
-0.0 and the clamp, and the FP8 GEMV (kiln/kernels/triton_fp8_gemv.py) against the dequantized product; their
input checks."""

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
                      "kiln.kernels.triton_fp8_gemv", "kiln.kernels.triton_fp8_quant"))

from kiln.kernels.triton_fp8_gemv import Fp8GemvConfig, fp8_gemv  # noqa: E402
from kiln.kernels.triton_fp8_quant import quantize_fp8_rows  # noqa: E402
from kiln.quant.fp8 import FP8_DTYPE, activation_scale, cast_fp8, quantize_weight  # noqa: E402


def _bytes(q: torch.Tensor) -> torch.Tensor:
    return q.cpu().view(torch.uint8)


def _every_e4m3_value_and_the_midpoints() -> torch.Tensor:
    """Each finite e4m3 value, each midpoint between neighbours (ties: even wins), points a little off the
    midpoints, both signs, zeros and values past 448 (clamped)."""
    codes = torch.arange(0x7F, dtype=torch.uint8)  # 0x7F is NaN
    grid = codes.view(FP8_DTYPE).double()
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20), grid[1:] * 0.75])
    pos = torch.cat([grid, mids, near, torch.tensor([460.0, 1e6, 2.0 ** -12, 2.0 ** -10 * 1.5])])
    return torch.cat([pos, -pos, torch.tensor([-0.0])]).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantization_rounds_every_value_as_torch_does(dtype):
    x = _every_e4m3_value_and_the_midpoints().to(dtype)
    x = torch.nn.functional.pad(x, (0, (-x.numel()) % 64)).reshape(-1, 64)  # rows of 64
    one = torch.ones(1)
    got, scale = quantize_fp8_rows(x.to(DEVICE), one.to(DEVICE))
    assert got.dtype == FP8_DTYPE and scale.tolist() == [1.0]
    assert torch.equal(_bytes(got), _bytes(cast_fp8(x, one)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, k", [(1, 48), (3, 100), (9, 1000), (2, 4096)])
def test_dynamic_static_and_given_scales_match_torch(dtype, rows, k):
    gen = torch.Generator().manual_seed(rows * 7 + k)
    x = (torch.randn(rows, k, generator=gen) * torch.logspace(-3, 2, rows).reshape(-1, 1)).to(dtype)
    x[0, :7] = 0.0
    if rows > 2:
        x[2] = 0.0  # an all-zero row: the minimum scale, zeros out
    static = torch.tensor([0.05], dtype=dtype)
    given = activation_scale(x, None) * 1.5
    for scale_in in (None, static, given):
        got, got_scale = quantize_fp8_rows(x.to(DEVICE), None if scale_in is None else scale_in.to(DEVICE))
        want_scale = activation_scale(x, None) if scale_in is None else scale_in.float().reshape(-1, 1) \
            if scale_in.numel() > 1 else scale_in.float().reshape(1)
        assert torch.equal(got_scale.cpu(), want_scale)
        assert torch.equal(_bytes(got), _bytes(cast_fp8(x, want_scale)))


def test_strided_rows_and_no_rows():
    x = torch.randn(4, 80)[:, 8:72]  # rows 80 apart, 64 wide
    got, scale = quantize_fp8_rows(x.to(DEVICE), None)
    assert torch.equal(_bytes(got), _bytes(cast_fp8(x, activation_scale(x, None))))
    empty, empty_scale = quantize_fp8_rows(torch.zeros(0, 64, device=DEVICE), None)
    assert empty.shape == (0, 64) and empty_scale.shape == (0, 1)


def test_quantization_says_what_was_wrong():
    with pytest.raises(ValueError, match="1 or 3 values"):
        quantize_fp8_rows(torch.randn(3, 16), torch.ones(2))
    with pytest.raises(ValueError, match="rows, K"):
        quantize_fp8_rows(torch.randn(16), None)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rows, n, k, bias", [(1, 37, 70, False), (3, 64, 130, True), (16, 5, 256, True)])
@pytest.mark.parametrize("row_scales", [False, True])
def test_gemv_matches_the_dequantized_product(per_channel, rows, n, k, bias, row_scales):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    q, scale = quantize_weight(torch.randn(n, k, generator=gen), per_channel, torch.float32)
    x = torch.randn(rows, k, generator=gen)
    x_scale = activation_scale(x, None if row_scales else torch.tensor([0.01]))
    xq = cast_fp8(x, x_scale)
    b = torch.randn(n, generator=gen) if bias else None
    config = Fp8GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)
    got = fp8_gemv(xq.to(DEVICE), x_scale.to(DEVICE), q.to(DEVICE), scale.to(DEVICE),
                   None if b is None else b.to(DEVICE), torch.float32, config)
    want = (xq.double() * x_scale.double()) @ (q.double() * scale.double().reshape(-1, 1)).T
    want = want + (0 if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("rows, n, k", [(1, 40, 520), (5, 64, 256), (16, 17, 1000)])
def test_split_gemv_matches_the_unsplit_and_leaves_its_counters_at_zero(split_k, rows, n, k):
    """Split along K (the last program of each column block sums the partials in split order): the unsplit kernel's
    result up to float32 summation order, the dequantized product's within float32, and the shared counters 0
    again (the next launch and every CUDA graph replay start from them)."""
    from kiln.kernels.triton_common import split_counters

    gen = torch.Generator().manual_seed(split_k * 100 + rows + n + k)
    q, scale = quantize_weight(torch.randn(n, k, generator=gen), True, torch.float32)
    x = torch.randn(rows, k, generator=gen)
    x_scale = activation_scale(x, None)
    xq = cast_fp8(x, x_scale)
    b = torch.randn(n, generator=gen)
    args = (xq.to(DEVICE), x_scale.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), b.to(DEVICE), torch.float32)
    unsplit = fp8_gemv(*args, Fp8GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=2, split_k=1))
    split = fp8_gemv(*args, Fp8GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=2, split_k=split_k))
    xd, wd = xq.double() * x_scale.double(), q.double() * scale.double().reshape(-1, 1)
    want = xd @ wd.T + b.double()
    # Float32 sums of the same products in two orders differ by at most a few units of the sum of their magnitudes
    # (one rounding per partial and per add: the GPU's fused multiply-adds are not the interpreter's numpy sums).
    bound = 8 * 2.0 ** -24 * (xd.abs() @ wd.abs().T + b.double().abs())
    assert ((split.cpu().double() - want).abs() <= bound + 1e-12).all()
    assert ((split.cpu().double() - unsplit.cpu().double()).abs() <= 2 * bound + 1e-12).all()
    assert not split_counters(torch.device(DEVICE)).any()


def test_the_default_split_fills_the_gpu_only_where_columns_are_few():
    from kiln.kernels.triton_fp8_gemv import split_for

    assert split_for(4096, 4096, Fp8GemvConfig(), 132) == 1  # the default never splits (measured no faster)
    config = Fp8GemvConfig(split_k=0)  # 32 columns a block, 256-deep tiles, split where the blocks are few
    assert split_for(12288, 4096, config, 132) == 1  # MPT-7B QKV: 384 blocks
    assert split_for(16384, 4096, config, 132) == 1  # up: 512 blocks
    assert split_for(4096, 4096, config, 132) == 3  # o_proj: 128 blocks -> 384 programs
    assert split_for(4096, 16384, config, 132) == 3  # down
    assert split_for(4096, 256, config, 132) == 1  # one tile: nothing to split
    assert split_for(4096, 4096, config._replace(split_k=5), 132) == 5


def test_gemv_says_what_was_wrong():
    q, scale = quantize_weight(torch.randn(8, 16), False, torch.float32)
    xq, one = cast_fp8(torch.randn(2, 16), torch.ones(1)), torch.ones(1)
    with pytest.raises(ValueError, match="float8_e4m3fn x and weight"):
        fp8_gemv(xq, one, q.float(), scale, None, torch.float32)
    with pytest.raises(ValueError, match="at most 16 rows"):
        fp8_gemv(cast_fp8(torch.randn(17, 16), one), one, q, scale, None, torch.float32)
    with pytest.raises(ValueError, match="1 or 8 values"):
        fp8_gemv(xq, one, q, torch.ones(3), None, torch.float32)
