"""SmoothQuant's Triton kernels (kiln.kernels.triton_smoothquant) against the torch path they replace, bit for bit:
the fused add + norm + quantize, the smoother + quantize, and the INT8 GEMM with its scaling epilogue. On the CPU
through Triton's interpreter, compiled on a GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from interpreted_triton import interpret_triton  # noqa: E402

if INTERPRET:
    interpret_triton(("kiln.kernels.triton_jit_common", "kiln.kernels.triton_gemv_kernels",
                      "kiln.kernels.triton_attention_kernels", "kiln.kernels.triton_kv_cache",
                      "kiln.kernels.triton_attention", "kiln.kernels.triton_moe_kernels", "kiln.kernels.triton_moe",
                      "kiln.kernels.triton_norm", "kiln.kernels.triton_ops", "kiln.kernels.triton_smoothquant"))

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton_norm import add_norm  # noqa: E402
from kiln.kernels.triton_common import split_counters  # noqa: E402
from kiln.kernels.triton_smoothquant import act_quant, add_norm_quant, int8_gemm, smooth_quant  # noqa: E402
from kiln.kernels.triton_smoothquant_configs import Int8GemmConfig, candidate_int8_configs  # noqa: E402
from kiln.kernels.triton_smoothquant_configs import default_int8_config  # noqa: E402
from kiln.layers.mlp import silu_and_mul  # noqa: E402
from kiln.quant.smoothquant import int8_matmul, quantize_activation, quantize_weight  # noqa: E402

DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]


def rows(tokens: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen) * torch.exp(torch.randn(1, dim, generator=gen))  # outlier channels
    x[min(1, tokens - 1)] = 0.0  # an all-zero token: per-token scale 1
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms, bias, residual", [(False, True, True), (False, False, False), (True, False, True)])
@pytest.mark.parametrize("static", [False, True])
def test_add_norm_quant_equals_norm_then_quantize(dtype, rms, bias, residual, static):
    x, res = rows(5, 80, dtype, 0), rows(5, 80, dtype, 1) if residual else None
    w = (torch.rand(80) + 0.5).to(dtype).to(DEVICE)
    b = torch.randn(80).to(dtype).to(DEVICE) if bias else None
    act = torch.tensor([0.05], device=DEVICE) if static else None
    if res is not None:
        res[1] = -x[1]  # keep the zero token zero after the add
    q, scale, summed = add_norm_quant(x, res, w, b, 1e-5, rms, act)
    normed, want_sum = add_norm(x, res, w, b, 1e-5, rms)  # the same norm arithmetic, then torch's quantization
    want_q, want_scale = quantize_activation(normed, act)
    assert torch.equal(summed, want_sum)
    assert torch.equal(scale, want_scale) and torch.equal(q, want_q)
    torch_normed = reference.add_norm(x, res, w, b, 1e-5, rms)[0]  # and torch's norm: within a rounding step
    assert (quantize_activation(torch_normed, act)[0].int() - q.int()).abs().max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoother, static", [(True, False), (True, True), (False, False)])
def test_smooth_quant_equals_torch(dtype, smoother, static):
    x = rows(6, 72, dtype, 2)
    s = (torch.rand(72) + 0.25).to(dtype).to(DEVICE) if smoother else None
    act = torch.tensor([0.03], device=DEVICE) if static else None
    q, scale = smooth_quant(x, s, act)
    want_q, want_scale = quantize_activation(x if s is None else x.float() * s.float(), act)
    assert torch.equal(scale, want_scale) and torch.equal(q, want_q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated, static", [(True, False), (True, True), (False, False)])
def test_act_quant_equals_activation_then_quantize(dtype, gated, static):
    """silu(gate) * up or exact GELU, times the smoother, quantized, against torch's ops then quantize_activation:
    equal int8 values but where exp/erf's last bit moves a value across a rounding boundary (one step, rarely)."""
    x = rows(7, 2 * 48 if gated else 48, dtype, 3)
    s = (torch.rand(48) + 0.25).to(dtype).to(DEVICE)
    act = torch.tensor([0.05], device=DEVICE) if static else None
    q, scale = act_quant(x, gated, s, act)
    torch_act = silu_and_mul(x) if gated else F.gelu(x)
    want_q, want_scale = quantize_activation(torch_act.float() * s.float(), act)
    assert torch.allclose(scale, want_scale, rtol=1e-5, atol=0)
    diff = (q.int() - want_q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02


def gemm_inputs(m: int, n: int, k: int, bias: bool, seed: int):
    """qx [m, k] int8, a_scale [m, 1] fp32, qw [n, k] int8 with w_scale [n] fp32, bias [n] (or None)."""
    gen = torch.Generator().manual_seed(seed)
    qx = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(DEVICE)
    qw, w_scale = quantize_weight(torch.randn(n, k, generator=gen), True, torch.float32)
    a_scale = (torch.rand(m, 1, generator=gen) / 100).to(DEVICE)
    b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    return qx, a_scale, qw.to(DEVICE), w_scale.to(DEVICE), b


def torch_gemm(qx, a_scale, qw, w_scale, b) -> torch.Tensor:
    """The contract (kiln.quant.sq_math.sq_linear's arithmetic), fp32: exact int sum, * a_scale * w_scale + bias."""
    want = int8_matmul(qx, qw) * a_scale * w_scale.float()
    return want if b is None else want + b


def assert_matches_torch(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit in the interpreter; compiled, the fp32 epilogue may fuse differently from torch's."""
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6) if not INTERPRET else torch.equal(got, want)


@pytest.mark.parametrize("m", [1, 19])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_gemm_epilogue_equals_torch(m, bias):
    qx, a_scale, qw, w_scale, b = gemm_inputs(m, 136, 200, bias, m)
    assert_matches_torch(int8_gemm(qx, a_scale, qw, w_scale, b, torch.float32), torch_gemm(qx, a_scale, qw, w_scale, b))


# K = 1056: 16.5 steps of 64, several slices for every tile; N = 72 leaves a partial N tile for every block_n.
GEMM_N, GEMM_K = 72, 1056


@pytest.mark.parametrize("m", [1, 3, 16, 17, 70])
def test_int8_gemm_every_candidate_gives_the_same_bits(m):
    """Every config the sweep times (split as it would be on an H100's 132 SMs: the most slices) against the default
    config and the torch reference, bit for bit: int32 sums are exact whatever the tiles and the split."""
    qx, a_scale, qw, w_scale, b = gemm_inputs(m, GEMM_N, GEMM_K, True, m)
    want = int8_gemm(qx, a_scale, qw, w_scale, b, torch.float32)
    assert_matches_torch(want, torch_gemm(qx, a_scale, qw, w_scale, b))
    configs = candidate_int8_configs(m, GEMM_N, GEMM_K, 132)
    assert configs[0] == default_int8_config(m, GEMM_N, GEMM_K, 132)
    for config in configs:
        assert torch.equal(int8_gemm(qx, a_scale, qw, w_scale, b, torch.float32, config=config), want), config


@pytest.mark.parametrize("m", [1, 3, 16, 17, 70])
@pytest.mark.parametrize("k, dtype, bias", [(288, torch.float32, True), (256, torch.bfloat16, False)])
def test_int8_gemm_split_k_is_exact(m, k, dtype, bias):
    """Explicit split-K (2, 3 slices, and more than K has steps: one step each) with a ragged last K tile or whole
    tiles only (EVEN_K), bf16 or fp32 out: the unsplit kernel's bits, and the counters left at 0 for the next
    launch."""
    qx, a_scale, qw, w_scale, b = gemm_inputs(m, GEMM_N, k, bias, k + m)
    tile = Int8GemmConfig(16 if m <= 16 else 32, 64, 64, 4, 3)
    want = int8_gemm(qx, a_scale, qw, w_scale, b, dtype, config=tile)
    if dtype == torch.float32:  # bf16 against the unsplit kernel only: the interpreter's fp32 -> bf16 truncates
        assert_matches_torch(want, torch_gemm(qx, a_scale, qw, w_scale, b))
    for split in (2, 3, 9):
        got = int8_gemm(qx, a_scale, qw, w_scale, b, dtype, config=replace(tile, split_k=split))
        assert torch.equal(got, want), split
    assert not split_counters(qx.device).any()


def test_int8_gemm_without_counters_runs_unsplit(monkeypatch):
    """No counters (first use inside a CUDA graph capture): the split config runs as one slice, the same bits."""
    import kiln.kernels.triton_smoothquant as sq

    qx, a_scale, qw, w_scale, b = gemm_inputs(3, GEMM_N, GEMM_K, True, 5)
    config = Int8GemmConfig(16, 32, 128, 4, 3, split_k=4)
    want = int8_gemm(qx, a_scale, qw, w_scale, b, torch.float32, config=config)
    monkeypatch.setattr(sq, "split_counters", lambda device: None)
    assert torch.equal(int8_gemm(qx, a_scale, qw, w_scale, b, torch.float32, config=config), want)


def test_int8_configs_fill_an_h100_at_decode():
    """MPT-7B's layers on 132 SMs: decode splits K until the grid holds >= 2 programs per SM and every slice keeps
    >= 2 K steps; prefill (2048 rows) runs big tiles unsplit; at most 8 candidates per row count."""
    for n, k in ((12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384)):
        for m in (1, 16):
            c = default_int8_config(m, n, k, 132)
            assert c.block_m == 16 and c.block_n <= 64 and c.block_k >= 128
            assert -(-n // c.block_n) * c.split_k >= 2 * 132 and k // (c.split_k * c.block_k) >= 2, (m, n, k, c)
        c = default_int8_config(2048, n, k, 132)
        assert c.block_m >= 64 and c.split_k == 1
        for m in (1, 16, 17, 2048):
            assert 1 <= len(candidate_int8_configs(m, n, k, 132)) <= 8


# ------------------------------------------------------------------------------------- bound into a whole model

@pytest.mark.skipif(not INTERPRET, reason="CPU models; on a GPU test_quant_smoothquant_gpu.py runs whole engines")
@pytest.mark.parametrize("family, mode", [("mpt", "tens-ch"), ("baichuan", "tok-ch")])
def test_bound_model_matches_torch_model(family, mode, tmp_path):
    """A tiny W8A8 model with the Triton matmuls and quantizing norms bound (bind_smoothquant) against the same
    model on the torch path: logits equal up to the norm's float rounding (an int8 value one step off, rarely)."""
    from test_quant_smoothquant import MODES, calibrated_dir, prefill_logits, quantized_model, version_flags

    from fixtures_kv_cache import calib_text
    from kiln.cli.main import main as kiln_main
    from kiln.kernels.triton_smoothquant import QuantizingActivation, QuantizingNorm, TritonSmoothQuantMatmul
    from kiln.kernels.triton_smoothquant import bind_smoothquant

    hf, text = calibrated_dir(tmp_path, family), calib_text(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert kiln_main(["convert", "--model_dir", str(hf), "--output_dir", str(ckpt), "--dtype", "float32",
                      "--smoothquant", "0.5", *MODES[mode], "--calib_size", "4", "--calib_max_seq_length", "32",
                      "--calib_dataset", str(text), *version_flags(family)]) == 0
    torch_model, triton_model = quantized_model(ckpt), quantized_model(ckpt)
    names = [n for n, _ in triton_model.named_parameters()]
    assert bind_smoothquant(triton_model) == 4 * len(triton_model.layers)
    assert [n for n, _ in triton_model.named_parameters()] == names  # the quantizing norms keep the parameters
    block = triton_model.layers["0"]
    assert isinstance(block.input_norm, QuantizingNorm) and isinstance(block.post_attn_norm, QuantizingNorm)
    assert isinstance(block.attn.o_proj.matmul, TritonSmoothQuantMatmul)
    assert isinstance(block.ffn.activation, QuantizingActivation)
    for ids in ([5, 17, 33, 2, 99, 150, 7], list(range(40, 61))):
        want, got = prefill_logits(torch_model, ids), prefill_logits(triton_model, ids)
        assert torch.allclose(got, want, rtol=1e-3, atol=2e-3), (got - want).abs().max()
