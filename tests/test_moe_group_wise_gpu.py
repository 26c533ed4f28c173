"""The group-wise fused MoE (kiln/kernels/triton_moe_group_wise.py) compiled on a real GPU: against the torch
reference at DBRX's expert shapes (a quarter of the experts' width; group 128, w2's slice starting mid-group as at tp
8), inside a captured CUDA graph replayed with new inputs, and a tiny DBRX group-wise engine giving the same greedy
tokens with graphs, eagerly and on the CPU."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

import kiln
from kiln.kernels import reference
from kiln.quant.group_wise import num_groups, pack_values

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
EXPERTS, FFN, HIDDEN, TOP_K = 16, 1344, 1536, 4  # DBRX's expert ffn per rank at tp 8 = 10.5 groups of 128


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _stored(rows: int, cols: int, k_offset: int, gen: torch.Generator):
    groups = num_groups(cols, 128, k_offset)
    q = torch.randint(0, 16, (EXPERTS, rows, cols), generator=gen)
    scale = ((torch.rand(EXPERTS, rows, groups, generator=gen) + 0.5) / (4 * cols**0.5)).to(torch.bfloat16)
    zero = torch.randint(0, 16, (EXPERTS, rows, groups), generator=gen).to(torch.bfloat16)
    return pack_values(q, 4).cuda(), scale.cuda(), zero.cuda()


def _experts(k2: int):
    gen = torch.Generator().manual_seed(k2)
    return (*_stored(2 * FFN, HIDDEN, 0, gen), *_stored(HIDDEN, FFN, k2, gen))


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 0.02 * want.float().abs().max().item() + 1e-3, err


@pytest.mark.parametrize("k2", [0, 64])
@pytest.mark.parametrize("tokens", [1, 5, 64, 600])
def test_group_wise_fused_moe_matches_reference(tokens, k2):
    from kiln.kernels.triton_moe_group_wise import fused_moe_group_wise

    w13, s13, z13, w2, s2, z2 = _experts(k2)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weights, ids = torch.softmax(torch.randn(tokens, EXPERTS, device="cuda"), -1).topk(TOP_K, dim=-1)
    got = fused_moe_group_wise(x, w13, s13, z13, w2, s2, z2, weights, ids, 0, 4, 128, 0, k2)
    want = reference.fused_moe_group_wise(x.float(), w13, s13.float(), z13.float(), w2, s2.float(), z2.float(),
                                          weights, ids, 0, 4, 128, 0, k2)
    _assert_close(got, want)


@pytest.mark.parametrize("k2", [0, 64])
def test_group_wise_fused_moe_ptx_dequantization_equals_plain(k2, monkeypatch):
    """The PTX dequantization (kiln/kernels/triton_dequant_asm.py) gives the plain path's output bit for bit."""
    from kiln.kernels import triton_common
    from kiln.kernels.triton_moe_group_wise import fused_moe_group_wise

    w13, s13, z13, w2, s2, z2 = _experts(k2)
    x = torch.randn(5, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weights, ids = torch.softmax(torch.randn(5, EXPERTS, device="cuda"), -1).topk(TOP_K, dim=-1)
    run = lambda: fused_moe_group_wise(x, w13, s13, z13, w2, s2, z2, weights, ids, 0, 4, 128, 0, k2)  # noqa: E731
    with_ptx = run()
    monkeypatch.setattr(triton_common, "ASM_DEQUANT", False)
    assert torch.equal(with_ptx, run())


def test_group_wise_fused_moe_in_a_cuda_graph():
    from kiln.kernels.triton_moe_group_wise import fused_moe_group_wise

    w13, s13, z13, w2, s2, z2 = _experts(64)
    x = torch.zeros(8, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weights = torch.full((8, TOP_K), 0.25, device="cuda")
    ids = torch.zeros(8, TOP_K, dtype=torch.int64, device="cuda")
    run = lambda: fused_moe_group_wise(x, w13, s13, z13, w2, s2, z2, weights, ids, 0, 4, 128, 0, 64)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in range(2):
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        w, i = torch.softmax(torch.randn(8, EXPERTS, device="cuda"), -1).topk(TOP_K, dim=-1)
        weights.copy_(w)
        ids.copy_(i)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(out, reference.fused_moe_group_wise(x.float(), w13, s13.float(), z13.float(), w2, s2.float(),
                                                          z2.float(), weights, ids, 0, 4, 128, 0, 64))


def test_dbrx_group_wise_engine_graphs_match_eager_and_cpu(tmp_path):
    """Round-to-nearest group-wise INT4 (group 32) experts: graph replays, eager GPU steps and the CPU's torch
    reference give the same greedy tokens."""
    from fixtures_dbrx import make_dbrx_checkpoint
    from kiln.checkpoint.convert import convert
    from kiln.cli.convert_cmd import plan_from_hf
    from kiln.cli.main import main
    from kiln.config import QuantConfig

    quant = QuantConfig(quant_algo="W4A16_AWQ", group_size=32, has_zero_point=True)
    plan = plan_from_hf(str(make_dbrx_checkpoint(tmp_path)[0]), "float32", 1, 1, quant=quant)
    plan = dataclasses.replace(plan, calibration=None, provenance={**plan.provenance, "model_dir": None})
    convert(plan, tmp_path / "ckpt", progress=False)
    assert main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                 "--max_batch_size", "6", "--max_input_len", "48", "--max_seq_len", "96", "--no_tune"]) == 0
    prompts = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61)), [3]]
    params = kiln.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    gpu = kiln.LLM(tmp_path / "engine", device="cuda", kernel_backend="triton")
    assert gpu.runner.graphs is not None  # the group-wise fused MoE never syncs with the host
    with_graphs = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
    gpu.runner.graphs = None
    eager = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
    cpu = [o.outputs[0].token_ids for o in kiln.LLM(tmp_path / "engine", device="cpu").generate(prompts, params)]
    assert with_graphs == eager == cpu
