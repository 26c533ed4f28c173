"""GPTQ act-order (desc_act, g_idx) layers on the Triton weight-only kernels (kiln/quant/act_order.py, the binding in
kiln/kernels/triton_weight_only.py), through Triton's interpreter on the CPU: a random act-order layer (a random
permutation behind its g_idx) against x @ dequant(W).T written out here in float64, 4 and 8 bits, decode and prefill
row counts; a row-parallel rank's scattered groups on padded tiles (named in a warning), and both ranks of a tp 2
split summing to the whole layer; the layouts; and a whole tiny MPT from a published act-order checkpoint, whose
logits on the kernels equal its torch path's and the dequantized-weights reference."""

from __future__ import annotations

import os
import warnings

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

import kiln  # noqa: E402
from kiln.config import QuantConfig  # noqa: E402
from kiln.kernels.triton_weight_only import FUSED_MAX_ROWS, ActOrderKernelMatmul, WeightOnlyKernelMatmul  # noqa: E402
from kiln.kernels.triton_weight_only import bind_weight_only  # noqa: E402
from kiln.layers.linear import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from kiln.quant.act_order import act_order_layout  # noqa: E402
from kiln.quant.apply import quantize_model  # noqa: E402
from weight_only_refs import pack_unsigned4  # noqa: E402


def act_order_g_idx(inp: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """GPTQ act-order's g_idx: the inputs quantized in a random order, input order[i] in group i // G."""
    order = torch.randperm(inp, generator=gen)
    g_idx = torch.empty(inp, dtype=torch.int64)
    g_idx[order] = torch.arange(inp) // group
    return g_idx


def fill_act_order_layer(layer, bits: int, group: int, g_idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random values, scales, zeros and `g_idx` into a quantized layer's parameters; returns its dense float64
    weight [out, in] = (q - zero[:, g_idx]) * scale[:, g_idx], written out here."""
    out, inp = layer.out_features, layer.in_features
    groups = layer.weight_scale.shape[1]
    top = 2**bits
    q = torch.randint(0, top, (out, inp), generator=gen)
    scale = torch.rand(out, groups, generator=gen) * 0.05 + 0.01
    zero = torch.randint(0, top, (out, groups), generator=gen).float()
    layer.weight.data.copy_(pack_unsigned4(q) if bits == 4 else q.to(torch.uint8).view(torch.int8))
    layer.weight_scale.data.copy_(scale)
    layer.weight_zero.data.copy_(zero)
    layer.weight_g_idx.data.copy_(g_idx.to(torch.int32))
    if layer.bias is not None:
        layer.bias.data.normal_(generator=gen)
    return (q.double() - zero.double()[:, g_idx]) * scale.double()[:, g_idx]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    atol = 1e-5 * max(1.0, want.abs().max().item())
    assert torch.allclose(got.cpu().double(), want, rtol=1e-5, atol=atol), (got.cpu().double() - want).abs().max()


@pytest.mark.parametrize("bits, group, inp, out", [(4, 32, 80, 24), (8, 64, 192, 10), (4, 128, 256, 16)])
def test_random_act_order_layer_matches_dequantized_reference(bits, group, inp, out):
    """Act-order layers are reordered and bound to the kernels (an input gather + the kernels), and compute
    x @ dequant(W).T + bias at decode and prefill row counts; 80 inputs in groups of 32 leave a short last group."""
    gen = torch.Generator().manual_seed(bits * 1000 + inp)
    layer = ColumnParallelLinear(inp, out, True, torch.float32)
    algo = "W4A16_GPTQ" if bits == 4 else "W8A16_GPTQ"
    quantize_model(layer, QuantConfig(quant_algo=algo, group_size=group, has_zero_point=True, act_order=True))
    dense = fill_act_order_layer(layer, bits, group, act_order_g_idx(inp, group, gen), gen)
    layer.to(DEVICE)
    assert bind_weight_only(layer) == 1
    assert isinstance(layer.matmul, ActOrderKernelMatmul)
    for rows in (1, 5, FUSED_MAX_ROWS + 3):
        x = torch.randn(rows, inp, generator=gen)
        close(layer(x.to(DEVICE)), x.double() @ dense.T + layer.bias.cpu().double())


@pytest.mark.parametrize("bits", [4, 8])
def test_row_parallel_rank_with_scattered_groups_runs_padded_tiles(bits):
    """Rank 1 of 2 of a row-parallel act-order layer holds a random half of every group: each group is padded to
    tiles of 32 (the weight grows, a warning names the layer) and still computes x @ dequant(W).T; its column-parallel
    neighbour keeps whole groups (no padding). Zero points of 2^bits (AutoGPTQ v1's +1) stay exact: pads read x = 0."""
    gen = torch.Generator().manual_seed(7 + bits)
    column = ColumnParallelLinear(128, 32, False, torch.float32, tp_size=2, tp_rank=1)
    row = RowParallelLinear(256, 24, True, torch.float32, tp_size=2, tp_rank=1)  # inputs 128..255 of 256
    layers = torch.nn.ModuleList([column, row])
    algo = "W4A16_GPTQ" if bits == 4 else "W8A16_GPTQ"
    quantize_model(layers, QuantConfig(quant_algo=algo, group_size=64, has_zero_point=True, act_order=True))
    dense = [fill_act_order_layer(column, bits, 64, act_order_g_idx(128, 64, gen), gen),
             fill_act_order_layer(row, bits, 64, act_order_g_idx(256, 64, gen)[128:], gen)]
    row.weight_zero.data[:, 1] = 2**bits  # AutoGPTQ v1 stores zero - 1: a zero of 2^bits reads back
    dense[1] = row_dense_with_zero(row, dense[1], bits)
    stored_width = row.weight.shape[1]
    layers.to(DEVICE)
    warned = r"^1 act-order .*row-parallel at tp > 1.*tiles of 32 inputs.*: 1 \(\+0\.0 MiB\)$"
    with pytest.warns(RuntimeWarning, match=warned):
        assert bind_weight_only(layers) == 2
    assert isinstance(column.matmul, ActOrderKernelMatmul) and not column.matmul.padded
    assert isinstance(row.matmul, ActOrderKernelMatmul) and row.matmul.padded
    assert row.weight.shape[1] > stored_width and row.weight.shape[1] * (8 // bits) % 32 == 0
    for layer, want in zip(layers, dense):
        for rows in (3, FUSED_MAX_ROWS + 1):
            x = torch.randn(rows, layer.in_features, generator=gen)
            close(layer(x.to(DEVICE)), x.double() @ want.T + (0 if layer.bias is None else layer.bias.cpu().double()))


def test_row_parallel_ranks_sum_to_the_whole_layer():
    """tp 2 end to end at the layer: both ranks of a row-parallel act-order layer (each a scattered half of every
    group, padded on the kernels) give partial products that sum to x @ dequant(W).T of the whole layer."""
    gen = torch.Generator().manual_seed(21)
    full_in, out, group = 384, 20, 128
    g_idx = act_order_g_idx(full_in, group, gen)
    q = torch.randint(0, 16, (out, full_in), generator=gen)
    scale = torch.rand(out, full_in // group, generator=gen) * 0.05 + 0.01
    zero = torch.randint(0, 16, (out, full_in // group), generator=gen).float()
    dense = (q.double() - zero.double()[:, g_idx]) * scale.double()[:, g_idx]
    x = torch.randn(5, full_in, generator=gen)
    total = torch.zeros(5, out, dtype=torch.float64)
    for rank in range(2):
        layer = RowParallelLinear(full_in, out, False, torch.float32, tp_size=2, tp_rank=rank)
        quantize_model(layer, QuantConfig(quant_algo="W4A16_GPTQ", group_size=group, has_zero_point=True,
                                          act_order=True))
        part = slice(rank * full_in // 2, (rank + 1) * full_in // 2)
        layer.weight.data.copy_(pack_unsigned4(q[:, part]))
        layer.weight_scale.data.copy_(scale)
        layer.weight_zero.data.copy_(zero)
        layer.weight_g_idx.data.copy_(g_idx[part].to(torch.int32))
        layer.to(DEVICE)
        with pytest.warns(RuntimeWarning, match="padded to tiles of 32"):
            assert bind_weight_only(layer) == 1
        total += layer.matmul(x[:, part].to(DEVICE), layer.weight, None).cpu().double()
    close(total, x.double() @ dense.T)


def row_dense_with_zero(layer, dense: torch.Tensor, bits: int) -> torch.Tensor:
    """The dense weight again after a zero point was changed: from the stored values, written out here."""
    stored = layer.weight.detach().view(torch.uint8).long()
    q = torch.stack([stored & 0xF, stored >> 4], -1).flatten(-2) if bits == 4 else stored
    g = layer.weight_g_idx.long()
    return (q.double() - layer.weight_zero.double()[:, g]) * layer.weight_scale.double()[:, g]


def test_layouts_the_kernels_can_read():
    gen = torch.Generator().manual_seed(3)
    g_idx = act_order_g_idx(80, 32, gen)
    layout = act_order_layout(g_idx, 32, 4)
    assert torch.equal(g_idx[layout.perm], torch.arange(80) // 32)  # contiguous groups, short one last
    assert (layout.k_offset, layout.group_size, layout.padded, layout.groups.tolist()) == (0, 32, False, [0, 1, 2])
    # A slice starting mid-group with in-order groups (static groups, or desc_act false): one tile offset, no gather.
    layout = act_order_layout(torch.arange(16, 80) // 32, 32, 4)
    assert layout.k_offset == 16 and torch.equal(layout.perm, torch.arange(64)) and not layout.padded
    # A rank's scattered half of groups of 128, or two odd partial groups at 4 bits: padded tiles of 32.
    odd_partials = torch.tensor([0] * 15 + [1] * 32 + [2] * 17)
    for g_idx, group in ((act_order_g_idx(512, 128, gen)[256:], 128), (odd_partials, 32)):
        layout = act_order_layout(g_idx, group, 4)
        assert layout.padded and layout.group_size == 32 and layout.k_offset == 0
        real = layout.perm < g_idx.numel()
        assert torch.equal(layout.perm[real].sort().values, torch.arange(g_idx.numel()))  # every input once
        tile_group = layout.groups.repeat_interleave(32)  # [width]
        assert torch.equal(g_idx[layout.perm[real]], tile_group[real])  # each tile holds its group's inputs only
        assert layout.perm.numel() == 32 * layout.groups.numel() and layout.groups.numel() <= g_idx.numel() // 32 + 4


def act_order_mpt_engine(tmp_path, dtype: str):
    """A tiny MPT published as an AutoGPTQ act-order checkpoint, converted and built at tp 1; returns the engine,
    the float reference state, the config and the number of quantized linears."""
    from fixtures_mpt import mpt_published_config, random_state, save_checkpoint
    from test_published_group_wise import GPTQ, MPT_LINEARS, publish
    from test_quant_group_wise import build
    from kiln.cli.main import main as kiln_main

    cfg = mpt_published_config()
    fmt = {**GPTQ, "bits": 4, "group_size": 32, "sym": False, "desc_act": True}
    prefixes = [f"transformer.blocks.{i}.{n}" for i in range(cfg["n_layers"]) for n in MPT_LINEARS]
    published, reference = publish(random_state(cfg), prefixes, fmt, seed=5)
    hf_dir = save_checkpoint(published, {**cfg, "quantization_config": fmt}, tmp_path / "hf")
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "ckpt"), "--dtype",
                      dtype]) == 0
    return build(tmp_path), reference, cfg, len(prefixes)


def bound_matmuls(model: torch.nn.Module) -> list[object]:
    kinds = (ActOrderKernelMatmul, WeightOnlyKernelMatmul)
    return [m.matmul for m in model.modules() if isinstance(getattr(m, "matmul", None), kinds)]


PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 52))]


@pytest.mark.skipif(not INTERPRET, reason="binds interpreted kernels on the CPU; the gpu test below is the CUDA one")
def test_published_act_order_mpt_runs_the_kernels_like_the_torch_path(tmp_path):
    """A whole tiny MPT from an AutoGPTQ act-order checkpoint (shuffled g_idx in every linear, groups of 32 with a
    short last one): every quantized linear is bound to the kernels, and the logits equal the torch path's and the
    float64 dequantized-weights reference."""
    from fixtures_mpt import reference_logits

    engine, reference, cfg, linears = act_order_mpt_engine(tmp_path, "float32")
    with kiln.LLM(engine, device="cpu") as llm:
        torch_path = [llm.score(p) for p in PROMPTS]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # at tp 1 nothing is left on the torch path
            assert bind_weight_only(llm.runner.model) == linears
        bound = bound_matmuls(llm.runner.model)
        assert len(bound) == linears and all(isinstance(m, ActOrderKernelMatmul) for m in bound)
        for prompt, want in zip(PROMPTS, torch_path):
            got = llm.score(prompt)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            ref = reference_logits(reference, cfg, prompt).double()
            assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_act_order_engine_on_gpu_binds_the_kernels_and_matches(tmp_path):
    """On CUDA, loading binds every act-order linear to the kernels (with CUDA graphs for decode); greedy tokens
    equal the CPU engine's (torch path) and logits stay within float16 rounding of the float64 reference."""
    from fixtures_mpt import reference_logits

    engine, reference, cfg, linears = act_order_mpt_engine(tmp_path, "float16")
    params = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with kiln.LLM(engine, device="cpu") as cpu:
        cpu_tokens = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params)]
    with kiln.LLM(engine, device="cuda") as gpu:
        bound = bound_matmuls(gpu.runner.model)
        assert len(bound) == linears and all(isinstance(m, ActOrderKernelMatmul) for m in bound)
        assert [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, params)] == cpu_tokens
        for prompt in PROMPTS:
            got, want = gpu.score(prompt).cpu().double(), reference_logits(reference, cfg, prompt)
            assert (got - want).abs().max() <= 2e-2 * want.abs().max()
