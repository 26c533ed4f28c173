"""The Triton fused MoE over W8A8 experts (kiln/kernels/triton_moe_w8a8*.py), SmoothQuant INT8 and FP8 e4m3,
through Triton's interpreter on the CPU (compiled on a GPU) against the torch references it replaces
(reference.fused_moe_sq, reference.fused_moe_fp8): per-token and static activation scales, per-channel and
per-tensor weight scales, odd expert counts, expert-parallel ranges, K not a multiple of the tile; its input checks;
one dbrx-tiny MoE on a rank of a tp 2 / ep 2 split; and a whole tiny DBRX converted with `--smoothquant 0.5
--per_token --per_channel` and with `--enable_fp8` whose logits through the Triton MoE equal the torch path's.

Tolerances: INT8 products are exact on both sides (int32 here, float64 in the reference) and the scales multiply in
the same order, so float32 results differ only where the kernel's exp() and the top-k sum order move the last bit;
such a bit can, rarely, move the GLU intermediate across a rounding boundary of its 8-bit quantization (one step of
1/127 of the row's amax, or of one e4m3 mantissa step), which is the bound the tolerances allow."""

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
                      "kiln.kernels.triton_weight_only_kernels", "kiln.kernels.triton_moe_kernels",
                      "kiln.kernels.triton_moe", "kiln.kernels.triton_norm",
                      "kiln.kernels.triton_smoothquant", "kiln.kernels.triton_moe_w8a8_kernels",
                      "kiln.kernels.triton_fp8_quant", "kiln.kernels.triton_moe_w8a8"))

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton_moe import GemmTile, MoeConfig  # noqa: E402
from kiln.kernels.triton_moe_w8a8 import fused_moe_fp8, fused_moe_sq  # noqa: E402
from kiln.quant import fp8  # noqa: E402
from kiln.quant.sq_math import quantize_weight  # noqa: E402

SMALL_TILES = MoeConfig(16, 2, GemmTile(16, 32, 4, 2), GemmTile(32, 32, 4, 2))


def routing(tokens: int, experts: int, start: int, top_k: int, gen: torch.Generator):
    """Weights and ids over `start + experts` experts (choices below `start` belong to another rank)."""
    total = experts + start
    weights, ids = torch.softmax(torch.randn(tokens, 2 * total, generator=gen), -1)[:, :total].topk(top_k, dim=-1)
    return weights.to(DEVICE), ids.to(DEVICE)


def sq_experts(experts, size, ffn, per_channel, static, dtype, gen):
    """Random W8A8 experts as convert stores them: int8 weights with their scales, w2's smoother, static scales."""
    def quantized(rows, cols):
        full = torch.randn(experts, rows, cols, generator=gen) * cols**-0.5
        q, s = zip(*(quantize_weight(w, per_channel, dtype) for w in full))
        return torch.stack(q).to(DEVICE), torch.stack(s).to(DEVICE)
    w13, s13 = quantized(2 * ffn, size)
    w2, s2 = quantized(size, ffn)
    smoother = (torch.rand(experts, ffn, generator=gen) + 0.5).to(dtype).to(DEVICE)
    w13_act = torch.tensor([3.0 / 127]).to(dtype).to(DEVICE) if static else None
    w2_act = ((torch.rand(experts, generator=gen) + 0.5) / 127).to(dtype).to(DEVICE) if static else None
    return w13, s13, w13_act, w2, s2, w2_act, smoother


def run_sq(tokens, size, ffn, experts, top_k, start, static, per_channel=True, dtype=torch.float32, config=None,
           seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13, s13, a13, w2, s2, a2, smoother = sq_experts(experts, size, ffn, per_channel, static, dtype, gen)
    x = torch.randn(tokens, size, generator=gen).to(dtype).to(DEVICE)
    weights, ids = routing(tokens, experts, start, top_k, gen)
    args = (w13, s13, a13, w2, s2, a2, smoother, weights, ids, start)
    got = fused_moe_sq(x, *args, config=config)
    want = reference.fused_moe_sq(x.cpu(), *(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    return got.cpu(), want


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("tokens, size, ffn, experts, top_k, start, config", [
    (1, 64, 32, 4, 2, 0, None),
    (5, 64, 48, 3, 2, 0, None),  # odd expert count
    (12, 96, 80, 4, 4, 4, None),  # expert parallel: this rank holds experts 4..7; K = 96 not a multiple of 64
    (37, 64, 40, 3, 2, 1, SMALL_TILES)])  # several row blocks per expert, K = 40 not a multiple of 32
def test_smoothquant_matches_the_torch_reference(static, tokens, size, ffn, experts, top_k, start, config):
    got, want = run_sq(tokens, size, ffn, experts, top_k, start, static, config=config, seed=tokens + ffn)
    assert want.abs().max() > 0.05  # the test would see a wrong kernel
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_smoothquant_per_tensor_weights_and_bfloat16():
    got, want = run_sq(9, 64, 48, 3, 2, 0, True, per_channel=False, seed=7)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    got, want = run_sq(9, 64, 48, 3, 2, 0, False, dtype=torch.bfloat16, seed=8)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want.float()).abs().max()
    assert err <= 0.02 * want.float().abs().max(), err


def fp8_experts(experts, size, ffn, per_channel, dtype, gen):
    scheme = fp8.FP8Scheme("test", per_channel, dynamic=False)
    w13, s13 = scheme.quantize(torch.randn(experts, 2 * ffn, size, generator=gen) * size**-0.5, dtype)
    w2, s2 = scheme.quantize(torch.randn(experts, size, ffn, generator=gen) * ffn**-0.5, dtype)
    return w13.to(DEVICE), s13.to(DEVICE), w2.to(DEVICE), s2.to(DEVICE)


def run_fp8(tokens, size, ffn, experts, top_k, start, static, per_channel, dtype=torch.float32, config=None,
            seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13, s13, w2, s2 = fp8_experts(experts, size, ffn, per_channel, dtype, gen)
    x = torch.randn(tokens, size, generator=gen).to(dtype).to(DEVICE)
    input_scale = torch.tensor([3.0 / 448]).to(dtype).to(DEVICE) if static else None
    weights, ids = routing(tokens, experts, start, top_k, gen)
    args = (w13, s13, w2, s2, input_scale, weights, ids, start)
    got = fused_moe_fp8(x, *args, config=config)
    want = reference.fused_moe_fp8(x.cpu(), *(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    return got.cpu(), want


@pytest.mark.parametrize("static, per_channel", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("tokens, size, ffn, experts, top_k, start, config", [
    (1, 64, 32, 4, 2, 0, None),
    (12, 96, 80, 3, 2, 2, None),  # expert parallel, odd expert count, K not a multiple of 64
    (37, 64, 40, 3, 2, 0, SMALL_TILES)])
def test_fp8_matches_the_torch_reference(static, per_channel, tokens, size, ffn, experts, top_k, start, config):
    got, want = run_fp8(tokens, size, ffn, experts, top_k, start, static, per_channel, config=config,
                        seed=tokens + ffn)
    assert want.abs().max() > 0.05
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


def test_fp8_bfloat16_matches_the_reference_within_its_rounding():
    """The reference multiplies in bfloat16 (the fake-quantized input and the dequantized weights rounded to 8 bits
    of mantissa, the GLU in bfloat16) where the kernel keeps float32 up to the intermediate, whose e4m3 quantization
    (steps of 1/16 of a value) then differs where the two roundings do."""
    got, want = run_fp8(9, 64, 48, 3, 2, 0, False, True, dtype=torch.bfloat16, seed=3)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want.float()).abs().max()
    assert err <= 0.05 * want.float().abs().max(), err


def test_refuses_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    w13, s13, a13, w2, s2, a2, smoother = sq_experts(2, 64, 32, True, True, torch.float32, gen)
    x = torch.randn(3, 64, generator=gen).to(DEVICE)
    weights, ids = torch.rand(3, 2).to(DEVICE), torch.tensor([[0, 1]] * 3).to(DEVICE)
    with pytest.raises(ValueError, match="w2_smoother must have shape"):
        fused_moe_sq(x, w13, s13, a13, w2, s2, a2, smoother[:, :16], weights, ids, 0)
    with pytest.raises(ValueError, match="both static scales or both None"):
        fused_moe_sq(x, w13, s13, a13, w2, s2, None, smoother, weights, ids, 0)
    with pytest.raises(ValueError, match="w13_scale must have shape"):
        fused_moe_sq(x, w13, s13[:, :1], a13, w2, s2, a2, smoother, weights, ids, 0)
    with pytest.raises(ValueError, match="w13 has dtype"):
        fused_moe_sq(x, w13.float(), s13, a13, w2, s2, a2, smoother, weights, ids, 0)
    q13, f13, q2, f2 = fp8_experts(2, 64, 32, False, torch.float32, gen)
    with pytest.raises(ValueError, match="w2 has dtype"):
        fused_moe_fp8(x, q13, f13, w2, f2, None, weights, ids, 0)
    with pytest.raises(ValueError, match="w2_scale must have shape"):
        fused_moe_fp8(x, q13, f13, q2, f2.expand(2, 7), None, weights, ids, 0)
    with pytest.raises(ValueError, match="input_scale must have shape"):
        fused_moe_fp8(x, q13, f13, q2, f2, torch.ones(2, device=DEVICE), weights, ids, 0)


def test_w8a8_moe_engines_may_capture_graphs():
    """The triton set binds these kernels (FP8 where the GPU has FP8 tensor cores), so a W8A8 MoE engine keeps CUDA
    graphs; the torch set's references read expert ids on the host, so they do not."""
    from types import SimpleNamespace

    from kiln.executor.model_runner import graphs_allowed
    from kiln.kernels import REFERENCE
    from kiln.kernels.triton_ops import triton_kernels

    kernels = triton_kernels(device=DEVICE)
    assert kernels.fused_moe_sq is fused_moe_sq
    if DEVICE.type == "cpu" or torch.cuda.get_device_capability() >= (8, 9):
        assert kernels.fused_moe_fp8 is fused_moe_fp8
    for algo in ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN", "FP8",
                 "FP8_PER_CHANNEL_PER_TOKEN"):
        info = SimpleNamespace(quant=SimpleNamespace(quant_algo=algo), model=SimpleNamespace(is_moe=True))
        assert graphs_allowed(info, kernels) == (kernels.fused_moe_fp8 is fused_moe_fp8 or "SQ" in algo)
        assert not graphs_allowed(info, REFERENCE)


def fill_quantized_moe(moe: torch.nn.Module, gen: torch.Generator) -> None:
    """Random values of the right kind for every parameter of a W8A8 MoE: 8-bit weights, scales that keep the
    activations of order one, smoothers near one."""
    for name, param in moe.named_parameters():
        shape = param.shape
        if param.dtype == torch.int8:
            value = torch.randint(-127, 128, shape, generator=gen)
        elif param.dtype == fp8.FP8_DTYPE:
            value = torch.randn(shape, generator=gen) * 64
        elif name in ("w13_scale", "w2_scale"):
            fan_in = (moe.w13 if name == "w13_scale" else moe.w2).shape[2]
            top = 127 if moe.w13.dtype == torch.int8 else 64
            value = (torch.rand(shape, generator=gen) + 0.5) / (top * fan_in**0.5)
        elif name == "w2_smoother":
            value = torch.rand(shape, generator=gen) + 0.5
        elif name.endswith("act_scale") or name.endswith("input_scale"):
            value = (torch.rand(shape, generator=gen) + 1.0) / 127
        else:
            value = torch.randn(shape, generator=gen)
        param.data.copy_(value.to(param.dtype))


@pytest.mark.parametrize("algo", ["W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL", "FP8",
                                  "FP8_PER_CHANNEL_PER_TOKEN"])
@pytest.mark.parametrize("moe_tp, moe_ep, rank", [(2, 1, 1), (1, 2, 1)])
def test_a_quantized_dbrx_moe_on_one_rank_runs_this_kernel_like_the_reference(algo, moe_tp, moe_ep, rank):
    """The wiring: a dbrx-tiny MoE quantized W8A8 on rank 1 of an experts tensor-parallel (ffn 96 / 2) or expert-
    parallel (experts 2..3) split of tp 2; its experts through the triton kernel set and through the torch one."""
    from kiln.checkpoint.sources import dummy_hf_config
    from kiln.config import Mapping, QuantConfig
    from kiln.kernels import REFERENCE
    from kiln.kernels.triton_ops import triton_kernels
    from kiln.layers.moe import MoE
    from kiln.models import family_for_hf_config
    from kiln.quant.apply import quantize_model

    hf = dummy_hf_config("dbrx-tiny", None)
    config = family_for_hf_config(hf).config_from_hf(hf, "float32")
    moe = MoE(config, Mapping(2, 2, 1, moe_tp, moe_ep, rank))
    quantize_model(moe, QuantConfig(quant_algo=algo, smoothquant_val=0.5 if "SQ" in algo else None))
    fill_quantized_moe(moe, torch.Generator().manual_seed(moe_tp))
    gen = torch.Generator().manual_seed(rank + moe_tp)
    x = torch.randn(6, config.hidden_size, generator=gen)
    weights, ids = torch.softmax(torch.randn(6, config.moe_num_experts, generator=gen), -1).topk(2, dim=-1)
    want = moe.run_experts(REFERENCE, x, weights, ids)
    got = moe.to(DEVICE).run_experts(triton_kernels(), x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE))
    assert want.abs().max() > 0.05
    assert torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-5), (got.cpu() - want).abs().max()


# ------------------------------------------------------------------------------------------ a whole tiny DBRX

@pytest.mark.skipif(not INTERPRET, reason="CPU models; on a GPU test_moe_w8a8_gpu.py runs whole engines")
@pytest.mark.parametrize("flags", [("--smoothquant", "0.5", "--per_token", "--per_channel"),
                                   ("--smoothquant", "0.5", "--per_channel"),
                                   ("--enable_fp8",), ("--enable_fp8", "--per_channel", "--per_token")])
def test_a_converted_tiny_dbrx_gives_the_torch_logits_through_the_triton_moe(flags, tmp_path):
    """dbrx-tiny converted (float32, calibrated on a local text), its prefill logits with the experts on the Triton
    W8A8 MoE (everything else on the torch kernels) against the torch path: equal up to the rare one-step flip of an
    8-bit intermediate that a last-bit difference upstream causes (see the module docstring)."""
    import dataclasses

    from test_quant_smoothquant import PROMPTS, calibrated_dir, prefill_logits, quantized_model

    from fixtures_kv_cache import calib_text
    from kiln.cli.main import main as kiln_main
    from kiln.kernels import REFERENCE

    hf, text = calibrated_dir(tmp_path, "dbrx"), calib_text(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert kiln_main(["convert", "--model_dir", str(hf), "--output_dir", str(ckpt), "--dtype", "float32", *flags,
                      "--calib_size", "4", "--calib_max_seq_length", "32", "--calib_dataset", str(text)]) == 0
    model = quantized_model(ckpt)
    assert model.layers["0"].ffn.w13.dtype in (torch.int8, fp8.FP8_DTYPE)
    triton_moe = dataclasses.replace(REFERENCE, name="torch+triton-moe", fused_moe_sq=fused_moe_sq,
                                     fused_moe_fp8=fused_moe_fp8)
    for ids in PROMPTS:
        want, got = prefill_logits(model, ids), prefill_logits(model, ids, triton_moe)
        assert torch.allclose(got, want, rtol=1e-3, atol=2e-3), (got - want).abs().max()
