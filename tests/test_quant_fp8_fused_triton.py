"""FP8 W8A8's quantization fused into the norm and the MLP activation (kiln/kernels/triton_fp8_fused.py) against the
unfused path, bit for bit: the add + norm kernel then kiln.quant.fp8's activation_scale and cast_fp8; FP8Matmul
taking the pre-quantized input giving what it gives quantizing itself (the torch reference, and the CUDA path's
Triton quantization, GEMV and _scaled_mm, run here through the interpreter and torch's CPU _scaled_mm); the binding
on tiny models (which norms and activations it swaps, and which it must not). On the CPU through Triton's
interpreter, compiled on a GPU. tests/test_quant_fp8_gpu.py runs whole CUDA engines with and without the fusion."""

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
    interpret_triton(("kiln.kernels.triton_jit_common", "kiln.kernels.triton_norm", "kiln.kernels.triton_fp8_quant",
                      "kiln.kernels.triton_gemv_kernels", "kiln.kernels.triton_fp8_gemv", "kiln.kernels.triton_fp8_fused"))

from kiln.kernels import reference, select_kernels  # noqa: E402
from kiln.kernels.triton_fp8_fused import act_fp8, add_norm_fp8, bind_fp8_fused  # noqa: E402
from kiln.kernels.triton_norm import add_norm  # noqa: E402
from kiln.layers.mlp import silu_and_mul  # noqa: E402
from kiln.layers.quantized_input import QuantizedActivation, QuantizingActivation, QuantizingNorm  # noqa: E402
from kiln.quant.fp8 import FP8_SCHEMES, activation_scale, cast_fp8  # noqa: E402
from kiln.quant.fp8_layers import FP8Matmul  # noqa: E402

# The interpreter rounds float32 -> bfloat16 toward zero (numpy has no bfloat16; Triton's emulation truncates), so
# bfloat16 runs where the kernels are compiled; float16 is numpy's, rounded to nearest even as torch does.
DTYPES = [torch.float32, torch.float16] if INTERPRET else [torch.float32, torch.float16, torch.bfloat16]
STATIC = torch.tensor([0.02])


def rows(tokens: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen) * torch.exp(torch.randn(1, dim, generator=gen))  # outlier channels
    return x.to(dtype).to(DEVICE)


def torch_quantized(v: torch.Tensor, static: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused path's quantization of v [tokens, dim]: (e4m3 bytes, float32 scale)."""
    scale = activation_scale(v, static)
    return cast_fp8(v, scale).view(torch.uint8), scale


def within_one_step(q: torch.Tensor, scale: torch.Tensor, v: torch.Tensor) -> bool:
    """q * scale is v to within one e4m3 step (3 mantissa bits; 2^-9 below the normals) and clamped at 448."""
    deq, vf = q.float() * scale, v.float().clamp(-448 * scale, 448 * scale)
    return bool(((deq - vf).abs() <= vf.abs() / 8 + scale / 512).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms, bias, residual", [(False, True, True), (False, False, False), (True, False, True),
                                                 (True, False, False)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dim", [80, 77])
def test_add_norm_fp8_equals_norm_then_quantize(dtype, rms, bias, residual, static, dim):
    x, res = rows(5, dim, dtype, 0), rows(5, dim, dtype, 1) if residual else None
    w = (torch.rand(dim) + 0.5).to(dtype).to(DEVICE)
    b = torch.randn(dim).to(dtype).to(DEVICE) if bias else None
    act = STATIC.to(DEVICE) if static else None
    q, scale, summed = add_norm_fp8(x, res, w, b, 1e-5, rms, act)
    normed, want_sum = add_norm(x, res, w, b, 1e-5, rms)  # the unfused CUDA path: this norm, then quantize
    want_q, want_scale = torch_quantized(normed, act)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (5, dim) and scale.dtype == torch.float32
    assert scale.shape == ((1,) if static else (5, 1))
    assert torch.equal(summed, want_sum) and (residual or summed is x)
    assert torch.equal(scale, want_scale) and torch.equal(q.view(torch.uint8), want_q)
    torch_normed = reference.add_norm(x, res, w, b, 1e-5, rms)[0]  # torch's own norm: within a rounding step
    assert within_one_step(q, scale, torch_normed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dim", [48, 37])
def test_act_fp8_equals_activation_then_quantize(dtype, gated, static, dim):
    """silu(gate) * up or exact GELU, quantized, against torch's ops then the torch quantization: the same bytes but
    where exp/erf's last bit (Triton's against torch's) moves a value across a rounding midpoint: one step, rarely."""
    x = rows(9, 2 * dim if gated else dim, dtype, 3) * 2
    act = STATIC.to(DEVICE) if static else None
    q, scale = act_fp8(x, gated, act)
    torch_act = silu_and_mul(x) if gated else F.gelu(x)
    want_q, want_scale = torch_quantized(torch_act, act)
    assert q.shape == (9, dim) and torch.allclose(scale, want_scale, rtol=1e-5, atol=0)
    differ = q.view(torch.uint8) != want_q
    assert differ.float().mean() < 0.02 and within_one_step(q, scale, torch_act)


def test_no_tokens_and_bad_rows():
    w = torch.ones(16, device=DEVICE)
    q, scale, summed = add_norm_fp8(torch.zeros(0, 16, device=DEVICE), None, w, None, 1e-5, True, None)
    assert q.shape == (0, 16) and scale.shape == (0, 1) and summed.shape == (0, 16)
    q, scale = act_fp8(torch.zeros(0, 32, device=DEVICE), True, STATIC.to(DEVICE))
    assert q.shape == (0, 16) and scale.shape == (1,)
    with pytest.raises(ValueError, match="contiguous along dim"):
        act_fp8(torch.zeros(4, 32, device=DEVICE)[:, ::2], False, None)


# ------------------------------------------------------------------------- FP8Matmul given its input quantized

BIND = FP8Matmul.bind


def cuda_path(mm: FP8Matmul, weight: torch.Tensor, dtype: torch.dtype) -> FP8Matmul:
    """`mm` bound as on an H100 (the Triton quantization, the FP8 GEMV up to 16 rows, _scaled_mm above), here
    through the interpreter and torch's CPU _scaled_mm."""
    BIND(mm, weight, dtype)
    mm.run, mm.quantize, mm.gemv_rows = mm.scaled_mm, mm.triton_quantize, 16
    return mm


@pytest.fixture
def force_cuda_path(monkeypatch):
    """Every FP8Matmul binds the CUDA path (cuda_path) whatever its weight's device."""
    monkeypatch.setattr(FP8Matmul, "bind", cuda_path)


def layer(algo: str, n: int, k: int, dtype: torch.dtype) -> tuple[FP8Matmul, torch.Tensor, torch.Tensor]:
    """An unbound FP8 layer's matmul, its weight [n, k] fp8 and bias [n]."""
    gen = torch.Generator().manual_seed(n + k)
    scheme = FP8_SCHEMES[algo]
    q, w_scale = scheme.quantize(torch.randn(n, k, generator=gen) * 0.1, dtype)
    static = None if scheme.dynamic else torch.tensor([0.03], dtype=dtype, device=DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype)
    return FP8Matmul(scheme, w_scale.to(DEVICE), static), q.to(DEVICE), bias.to(DEVICE)


@pytest.mark.parametrize("algo", sorted(FP8_SCHEMES))
def test_reference_matmul_of_a_quantized_input_equals_quantizing_itself(algo):
    mm, q, bias = layer(algo, 24, 40, torch.float32)
    mm.run = mm.reference
    x = rows(6, 40, torch.float32, 5)
    pre = QuantizedActivation(*mm.torch_quantize(x), x.dtype)
    assert torch.equal(mm(pre, q, bias), mm(x, q, bias))


@pytest.mark.parametrize("algo", sorted(FP8_SCHEMES))
@pytest.mark.parametrize("tokens", [3, 20])  # the FP8 GEMV, _scaled_mm
def test_cuda_path_matmul_of_the_fused_norm_equals_norm_then_matmul(algo, tokens):
    dtype = torch.float16 if INTERPRET else torch.bfloat16  # bfloat16: _scaled_mm's row-wise scales on a GPU
    mm, q, bias = layer(algo, 32, 48, dtype)
    mm = cuda_path(mm, q, dtype)
    x, res = rows(tokens, 48, dtype, 6), rows(tokens, 48, dtype, 7)
    w = (torch.rand(48) + 0.5).to(dtype).to(DEVICE)
    normed, _ = add_norm(x, res, w, None, 1e-5, True)
    fused = QuantizedActivation(*add_norm_fp8(x, res, w, None, 1e-5, True, mm.input_scale32)[:2], dtype)
    got, want = mm(fused, q, bias), mm(normed, q, bias)
    assert got.dtype == dtype and got.shape == (tokens, 32) and torch.equal(got, want)


# ------------------------------------------------------------------------------------------- bound into a model

def tiny_fp8_model(tmp_path, preset: str, dynamic: bool) -> torch.nn.Module:
    from test_quant_smoothquant import quantized_model

    from kiln.cli.main import main as kiln_main

    flags = ["--per_channel", "--per_token"] if dynamic else []
    ckpt = tmp_path / f"{preset}-{dynamic}"
    assert kiln_main(["convert", "--preset", preset, "--output_dir", str(ckpt), "--dtype", "float32",
                      "--enable_fp8", *flags]) == 0
    return quantized_model(ckpt)


def swapped(model: torch.nn.Module) -> dict[str, list[str]]:
    """Which norms / activations of each block quantize for the next layer."""
    return {i: [name for name, part in (("input_norm", b.input_norm), ("post_attn_norm", b.post_attn_norm),
                                         ("activation", b.ffn.__dict__.get("activation")))
                if isinstance(part, (QuantizingNorm, QuantizingActivation))] for i, b in model.layers.items()}


@pytest.mark.skipif(not INTERPRET, reason="CPU models; on a GPU test_quant_fp8_gpu.py runs whole engines")
@pytest.mark.parametrize("preset, dynamic", [("mpt-tiny", False), ("baichuan-tiny", True), ("dbrx-tiny", True)])
def test_bound_model_swaps_the_intended_modules_and_matches(preset, dynamic, tmp_path, force_cuda_path):
    """QKV's norm, a dense MLP's norm and activation quantize for their FP8 layer; DBRX's router reads the float
    norm output (its post_attn_norm stays). With the norms fused the logits equal the unfused model's bit for bit
    (the same norm arithmetic and quantization); with the activation too, up to exp/erf's last bit."""
    from test_quant_smoothquant import prefill_logits

    from kiln.kernels.triton_norm import add_norm as triton_add_norm

    unfused, fused = tiny_fp8_model(tmp_path, preset, dynamic), tiny_fp8_model(tmp_path, preset, dynamic)
    names = [n for n, _ in fused.named_parameters()]
    count = bind_fp8_fused(fused)
    assert [n for n, _ in fused.named_parameters()] == names  # the quantizing norms keep the parameters
    moe = preset.startswith("dbrx")
    want = ["input_norm"] if moe else ["input_norm", "post_attn_norm", "activation"]
    assert swapped(fused) == {i: want for i in fused.layers} and count == len(want) * len(fused.layers)
    kernels = replace(select_kernels(torch.device("cpu")), add_norm=triton_add_norm)  # the CUDA path's norm
    for ids in ([5, 17, 33, 2, 99, 150, 7], list(range(40, 61))):  # 7 rows: the GEMV; 21: _scaled_mm
        base, got = prefill_logits(unfused, ids, kernels), prefill_logits(fused, ids, kernels)
        assert torch.allclose(got, base, rtol=1e-2, atol=1e-2), (got - base).abs().max()
    for block in fused.layers.values():
        block.ffn.__dict__.pop("activation", None)  # back to torch's activation: only the norms fused
    for ids in ([5, 17, 33, 2, 99, 150, 7], list(range(40, 61))):
        assert torch.equal(prefill_logits(fused, ids, kernels), prefill_logits(unfused, ids, kernels))


@pytest.mark.skipif(not INTERPRET, reason="CPU models")
def test_binding_leaves_row_parallel_per_token_at_tp2_the_cpu_and_the_switch(tmp_path, monkeypatch):
    from kiln.quant import fp8_layers

    model = tiny_fp8_model(tmp_path, "mpt-tiny", dynamic=True)
    assert bind_fp8_fused(model) == 0 and not any(swapped(model).values())  # the CPU: the torch reference stays
    monkeypatch.setattr(FP8Matmul, "bind", cuda_path)
    monkeypatch.setenv("KILN_FP8_FUSED", "0")
    assert bind_fp8_fused(model) == 0 and not any(swapped(model).values())
    monkeypatch.delenv("KILN_FP8_FUSED")
    monkeypatch.setattr(fp8_layers, "tp_size", lambda: 2)  # down_proj's per-token scale: the max over the ranks
    model = tiny_fp8_model(tmp_path, "mpt-tiny", dynamic=True)
    bind_fp8_fused(model)
    assert swapped(model) == {i: ["input_norm", "post_attn_norm"] for i in model.layers}
