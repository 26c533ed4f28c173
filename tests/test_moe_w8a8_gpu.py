"""The W8A8 fused MoE (kiln/kernels/triton_moe_w8a8.py) compiled on a real GPU: SmoothQuant INT8 on the int8 tensor
cores and FP8 on the e4m3 ones (sm_89+), against the torch references at DBRX's expert shapes (a quarter of the
experts' width, as at tp 4), inside a captured CUDA graph replayed with new inputs, and a tiny DBRX SmoothQuant /
FP8 engine giving the same greedy tokens with graphs and eagerly."""

from __future__ import annotations

import gc

import pytest
import torch

import kiln
from kiln.kernels import reference
from kiln.quant import fp8
from kiln.quant.sq_math import quantize_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
EXPERTS, FFN, HIDDEN, TOP_K = 16, 2688, 1536, 4
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="FP8 tensor cores need sm_89+")


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _sq_experts(static: bool):
    gen = torch.Generator().manual_seed(int(static))

    def quantized(rows, cols):
        q, s = zip(*(quantize_weight(torch.randn(rows, cols, generator=gen) * cols**-0.5, True, torch.bfloat16)
                     for _ in range(EXPERTS)))
        return torch.stack(q).cuda(), torch.stack(s).cuda()
    w13, s13 = quantized(2 * FFN, HIDDEN)
    w2, s2 = quantized(HIDDEN, FFN)
    smoother = (torch.rand(EXPERTS, FFN, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    a13 = torch.tensor([4.0 / 127], dtype=torch.bfloat16, device="cuda") if static else None
    a2 = torch.full((EXPERTS,), 1.0 / 127, dtype=torch.bfloat16, device="cuda") if static else None
    return w13, s13, a13, w2, s2, a2, smoother


def _fp8_experts(per_channel: bool):
    gen = torch.Generator().manual_seed(2)
    scheme = fp8.FP8Scheme("test", per_channel, dynamic=True)
    w13, s13 = scheme.quantize(torch.randn(EXPERTS, 2 * FFN, HIDDEN, generator=gen) * HIDDEN**-0.5, torch.bfloat16)
    w2, s2 = scheme.quantize(torch.randn(EXPERTS, HIDDEN, FFN, generator=gen) * FFN**-0.5, torch.bfloat16)
    return w13.cuda(), s13.cuda(), w2.cuda(), s2.cuda()


def _routing(tokens: int):
    return torch.softmax(torch.randn(tokens, EXPERTS, device="cuda"), -1).topk(TOP_K, dim=-1)


def _assert_close(got: torch.Tensor, want: torch.Tensor, share: float = 0.03) -> None:
    """bf16: the references round the GLU intermediate and each product as torch's bf16 ops do; the kernels keep
    float32 up to the 8-bit intermediate, whose quantization step then decides where they differ."""
    err = (got.float() - want.float()).abs().max().item()
    assert err <= share * want.float().abs().max().item() + 1e-3, err


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 64, 600])
def test_smoothquant_fused_moe_matches_reference(tokens, static):
    from kiln.kernels.triton_moe_w8a8 import fused_moe_sq

    experts = _sq_experts(static)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weights, ids = _routing(tokens)
    _assert_close(fused_moe_sq(x, *experts, weights, ids, 0), reference.fused_moe_sq(x, *experts, weights, ids, 0))


@needs_fp8
@pytest.mark.parametrize("per_channel, static", [(False, True), (True, False)])
@pytest.mark.parametrize("tokens", [1, 5, 64, 600])
def test_fp8_fused_moe_matches_reference(tokens, per_channel, static):
    from kiln.kernels.triton_moe_w8a8 import fused_moe_fp8

    w13, s13, w2, s2 = _fp8_experts(per_channel)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    scale = torch.tensor([4.0 / 448], device="cuda") if static else None
    weights, ids = _routing(tokens)
    got = fused_moe_fp8(x, w13, s13, w2, s2, scale, weights, ids, 0)
    _assert_close(got, reference.fused_moe_fp8(x, w13, s13, w2, s2, scale, weights, ids, 0), 0.05)


def _replays_match(run, reference_run, x, weights, ids) -> None:
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in range(2):
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        w, i = _routing(x.shape[0])
        weights.copy_(w)
        ids.copy_(i)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(out, reference_run(), 0.05)


@pytest.mark.parametrize("kind", ["sq_per_token", "sq_static", "fp8_dynamic"])
def test_w8a8_fused_moe_in_a_cuda_graph(kind):
    from kiln.kernels.triton_moe_w8a8 import fused_moe_fp8, fused_moe_sq

    if kind.startswith("fp8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89+")
    x = torch.zeros(8, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weights = torch.full((8, TOP_K), 0.25, device="cuda")
    ids = torch.zeros(8, TOP_K, dtype=torch.int64, device="cuda")
    if kind.startswith("sq"):
        experts = _sq_experts(kind == "sq_static")
        _replays_match(lambda: fused_moe_sq(x, *experts, weights, ids, 0),
                       lambda: reference.fused_moe_sq(x, *experts, weights, ids, 0), x, weights, ids)
    else:
        w13, s13, w2, s2 = _fp8_experts(True)
        _replays_match(lambda: fused_moe_fp8(x, w13, s13, w2, s2, None, weights, ids, 0),
                       lambda: reference.fused_moe_fp8(x, w13, s13, w2, s2, None, weights, ids, 0), x, weights, ids)


@pytest.mark.parametrize("flags", [("--smoothquant", "0.5", "--per_token", "--per_channel"), ("--enable_fp8",)])
def test_dbrx_w8a8_engine_graphs_match_eager(flags, tmp_path):
    """A calibrated tiny DBRX (float32) in W8A8: its experts on the Triton W8A8 MoE, so the engine captures CUDA
    graphs; replays and eager steps give the same greedy tokens."""
    from fixtures_kv_cache import calib_text, tiny_hf_dir
    from kiln.cli.main import main

    if "--enable_fp8" in flags and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89+")
    model_dir, text = tiny_hf_dir(tmp_path, "dbrx"), calib_text(tmp_path)
    assert main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "ckpt"), "--dtype",
                 "float32", *flags, "--calib_size", "4", "--calib_max_seq_length", "32", "--calib_dataset",
                 str(text)]) == 0
    assert main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                 "--max_batch_size", "6", "--max_input_len", "48", "--max_seq_len", "96", "--no_tune"]) == 0
    prompts = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61)), [3]]
    params = kiln.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    gpu = kiln.LLM(tmp_path / "engine", device="cuda", kernel_backend="triton")
    assert gpu.runner.graphs is not None  # the W8A8 fused MoE never syncs with the host
    with_graphs = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
    gpu.runner.graphs = None
    eager = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
    assert with_graphs == eager
