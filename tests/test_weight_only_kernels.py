"""The weight-only Triton kernels (kiln/kernels/triton_weight_only*.py) through Triton's interpreter on the CPU,
against x @ dequant(W).T written out in float64: per channel and group-wise (G 32/64/128, k_offset != 0, zeros),
INT8 and INT4, bias, M = 1..16, the 64-row tile, split K, the dequantize + matmul path for prefill rows; and the
binding of a quantized model's linear layers; the fused MoE over per-channel INT8/INT4 experts against the torch
reference."""

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
                      "kiln.kernels.triton_weight_only_kernels", "kiln.kernels.triton_weight_only",
                      "kiln.kernels.triton_weight_only_gemv_kernels", "kiln.kernels.triton_weight_only_gemv",
                      "kiln.kernels.triton_moe_kernels", "kiln.kernels.triton_moe",
                      "kiln.kernels.triton_moe_weight_only_kernels", "kiln.kernels.triton_moe_weight_only"))

from kiln.kernels.triton_weight_only import FUSED_MAX_ROWS, WeightOnlyFormat, dequantize_weight  # noqa: E402
from kiln.kernels.triton_weight_only import weight_only_matmul  # noqa: E402
from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton_moe import GemmTile, MoeConfig  # noqa: E402
from kiln.kernels.triton_moe_weight_only import fused_moe_weight_only  # noqa: E402
from kiln.quant.weight_only import pack_int4, quantize_per_channel  # noqa: E402
from weight_only_refs import group_wise, per_channel  # noqa: E402


def stored_weight(fmt: WeightOnlyFormat, n: int, k: int, gen: torch.Generator):
    """(stored weight, scale, zero or None, dense float64 [n, k]) of a random weight in `fmt`."""
    if fmt.group_size:
        return group_wise(n, k, fmt.bits, fmt.group_size, fmt.k_offset, gen)
    (weight, scale, dense), zero = per_channel(n, k, fmt.bits, gen), None
    return weight, scale, zero, dense


def _dev(t):
    return None if t is None else t.to(DEVICE)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    atol = 1e-5 * max(1.0, want.abs().max().item())  # fp32 sums of a few hundred terms of size ~1
    assert torch.allclose(got.cpu().double(), want, rtol=1e-5, atol=atol), (got.cpu().double() - want).abs().max()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows, n, k, bias", [(1, 37, 70, False), (5, 64, 130, True), (16, 5, 2, True),
                                              (33, 70, 64, False), (FUSED_MAX_ROWS + 3, 20, 34, True)])
def test_per_channel_matches_dequantized_reference(bits, rows, n, k, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k + bits)
    weight, scale, dense = per_channel(n, k, bits, gen)
    x = torch.randn(rows, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    got = weight_only_matmul(_dev(x), _dev(weight), _dev(scale), None, _dev(b), WeightOnlyFormat(bits))
    _close(got, x.double() @ dense.T + (0 if b is None else b.double()))


@pytest.mark.parametrize("bits, group, k_offset, rows, n, k", [
    (4, 32, 0, 1, 33, 96), (4, 64, 16, 3, 40, 200), (4, 128, 64, 16, 70, 260), (4, 128, 0, 2, 16, 256),
    (8, 32, 5, 4, 24, 80), (8, 128, 100, 7, 9, 300), (4, 32, 6, FUSED_MAX_ROWS + 1, 18, 70)])
@pytest.mark.parametrize("bias", [False, True])
def test_group_wise_matches_dequantized_reference(bits, group, k_offset, rows, n, k, bias):
    gen = torch.Generator().manual_seed(bits * 7 + group + k_offset + rows + n + k)
    weight, scale, zero, dense = group_wise(n, k, bits, group, k_offset, gen)
    x = torch.randn(rows, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    got = weight_only_matmul(_dev(x), _dev(weight), _dev(scale), _dev(zero), _dev(b),
                             WeightOnlyFormat(bits, group, k_offset))
    _close(got, x.double() @ dense.T + (0 if b is None else b.double()))


@pytest.mark.parametrize("fmt, rows, last_reduces", [(WeightOnlyFormat(4), 2, True), (WeightOnlyFormat(4), 2, False),
                                                      (WeightOnlyFormat(4, 128, 32), 20, True),
                                                      (WeightOnlyFormat(8, 64, 0), 2, True)])
def test_split_k_sums_the_slices(fmt, rows, last_reduces, monkeypatch):
    """K long enough that the launcher splits it (4 SMs stand in on the CPU): the slices' partials add up, summed by
    the last program of each (row block, column block) (its counters back to 0 after) or by a second kernel."""
    from kiln.kernels import triton_gemv
    from kiln.kernels.triton_common import split_counters
    from kiln.kernels.triton_weight_only_configs import WoConfig

    monkeypatch.setattr(triton_gemv, "LAST_PROGRAM_REDUCES", last_reduces)
    gen = torch.Generator().manual_seed(3)
    n, k = 40, 2048
    weight, scale, zero, dense = stored_weight(fmt, n, k, gen)
    x = torch.randn(rows, k, generator=gen)
    b = torch.randn(n, generator=gen)
    config = WoConfig(16, 64 if fmt.group_size else 128, 4, 4, 2)  # 3 column blocks x 4 splits
    _close(weight_only_matmul(_dev(x), _dev(weight), _dev(scale), _dev(zero), _dev(b), fmt, config),
           x.double() @ dense.T + b.double())
    assert int(split_counters(DEVICE).count_nonzero()) == 0


@pytest.mark.parametrize("fmt", [WeightOnlyFormat(4), WeightOnlyFormat(8), WeightOnlyFormat(4, 32, 10),
                                 WeightOnlyFormat(8, 128, 0), WeightOnlyFormat(4, 128, 0), WeightOnlyFormat(4, 64, 16),
                                 WeightOnlyFormat(8, 32, 8), WeightOnlyFormat(4, 96, 6)])
def test_dequantize_gives_the_reference_values(fmt):
    """Per channel, and group-wise through the one-group-per-program kernel (power-of-two groups, with k_offset:
    the first group partly masked) or the element-wise one (group 96); n past one 64-row block, K ragged."""
    gen = torch.Generator().manual_seed(5)
    n, k = 70, 150
    weight, scale, zero, dense = stored_weight(fmt, n, k, gen)
    got = dequantize_weight(_dev(weight), _dev(scale), _dev(zero), fmt, torch.float32)
    assert torch.allclose(got.cpu().double(), dense, rtol=1e-6, atol=0)


@pytest.mark.parametrize("group, k_offset", [(128, 0), (32, 10)])
def test_group_dequantize_equals_the_element_wise_kernel_in_bfloat16(group, k_offset):
    """bf16 scales and zeros: the one-group-per-program kernel gives the element-wise kernel's bits ((q - zero)
    rounded to bf16, times the scale), and the torch dequantize's values (bit for bit on a GPU; the interpreter
    rounds bf16 differently, within one bf16 step)."""
    from kiln.kernels.triton_common import cdiv
    from kiln.kernels.triton_weight_only_kernels import dequantize_kernel
    from kiln.quant.group_wise import dequantize_groups

    gen = torch.Generator().manual_seed(8)
    n, k = 66, 256
    weight, scale, zero, _ = group_wise(n, k, 4, group, k_offset, gen, torch.bfloat16)
    weight, scale, zero = _dev(weight), _dev(scale), _dev(zero)
    got = dequantize_weight(weight, scale, zero, WeightOnlyFormat(4, group, k_offset), torch.bfloat16)
    element_wise = torch.empty_like(got)
    dequantize_kernel[(cdiv(n, 32), cdiv(k // 2, 64))](
        weight, scale, zero, element_wise, n, k, k // 2, k_offset, weight.stride(0), scale.stride(0),
        element_wise.stride(0), BITS=4, GROUP=group, HAS_ZERO=True, BLOCK_N=32, BLOCK_B=64)
    assert torch.equal(got, element_wise)
    want = dequantize_groups(weight.cpu(), scale.cpu(), zero.cpu(), 4, group, torch.bfloat16, k_offset)
    assert torch.allclose(got.cpu().float(), want.float(), rtol=2**-7, atol=0)


def test_bfloat16_inputs():
    gen = torch.Generator().manual_seed(9)
    weight, scale, zero, dense = group_wise(48, 256, 4, 128, 0, gen, torch.bfloat16)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    got = weight_only_matmul(_dev(x), _dev(weight), _dev(scale), _dev(zero), None, WeightOnlyFormat(4, 128))
    assert got.dtype == torch.bfloat16
    want = x.double() @ dense.T
    assert torch.allclose(got.cpu().double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_bad_formats_say_what_was_wrong():
    gen = torch.Generator().manual_seed(0)
    weight, scale, zero, _ = group_wise(8, 64, 4, 32, 0, gen)
    x = torch.randn(2, 64, generator=gen)
    with pytest.raises(ValueError, match="k_offset must be in 0..31"):
        weight_only_matmul(x, weight, scale, zero, None, WeightOnlyFormat(4, 32, 3))
    with pytest.raises(ValueError, match="multiple of 32"):
        weight_only_matmul(x, weight, scale, zero, None, WeightOnlyFormat(4, 48, 0))
    with pytest.raises(ValueError, match="group-wise scale must be"):
        weight_only_matmul(x, weight, scale[:, :1], zero[:, :1], None, WeightOnlyFormat(4, 32, 0))
    with pytest.raises(ValueError, match="no zero point"):
        weight_only_matmul(x, weight, scale[:, 0], zero[:, 0], None, WeightOnlyFormat(4))


@pytest.mark.parametrize("algo", ["W8A16", "W4A16"])
def test_bound_layers_match_the_torch_path(algo):
    """bind_weight_only swaps a quantized layer's torch matmul for the kernels' (read from its bits/scale/zero/
    group_size/k_offset attributes); outputs agree at decode and prefill row counts."""
    from kiln.config import QuantConfig
    from kiln.kernels.triton_weight_only import WeightOnlyKernelMatmul, bind_weight_only
    from kiln.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    from kiln.quant.apply import WeightOnlyMatmul, quantize_model

    bits = 8 if algo == "W8A16" else 4
    layers = torch.nn.ModuleList([ColumnParallelLinear(64, 48, True, torch.float32),
                                  RowParallelLinear(48, 32, False, torch.float32),
                                  ReplicatedLinear(32, 8, False, torch.float32)])
    quantize_model(layers, QuantConfig(quant_algo=algo))
    gen = torch.Generator().manual_seed(11)
    for layer in layers[:2]:
        weight, scale, _ = per_channel(layer.out_features, layer.in_features, bits, gen)
        layer.weight.data.copy_(weight)
        layer.weight_scale.data.copy_(scale)
        if layer.bias is not None:
            layer.bias.data.normal_(generator=gen)
    layers[2].weight.data.normal_(generator=gen)
    torch_matmuls = [layer.matmul for layer in layers]
    assert isinstance(torch_matmuls[0], WeightOnlyMatmul) and torch_matmuls[0].group_size == 0
    layers.to(DEVICE)
    assert bind_weight_only(layers) == 2  # the replicated (float) layer keeps F.linear
    assert all(isinstance(layer.matmul, WeightOnlyKernelMatmul) for layer in layers[:2])
    for rows in (1, 7, FUSED_MAX_ROWS + 5):
        x = torch.randn(rows, 64, generator=gen).to(DEVICE)
        for layer, reference in zip(layers, torch_matmuls):
            want = reference(x.cpu(), layer.weight.cpu(), None if layer.bias is None else layer.bias.cpu())
            got = layer(x)
            assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-5)
            x = got


def test_bound_group_wise_layers_match_the_torch_path():
    """The kernels bound to kiln's own group-wise layers (kiln.quant.apply, W4A16_GPTQ, groups of 32) compute what
    their torch matmul does, also on a rank whose input slice starts inside a group (row parallel, rank 1 of 2:
    k_offset 16)."""
    from kiln.config import QuantConfig
    from kiln.kernels.triton_weight_only import WeightOnlyKernelMatmul, bind_weight_only
    from kiln.layers.linear import ColumnParallelLinear, RowParallelLinear
    from kiln.quant.apply import quantize_model
    from kiln.quant.group_wise import pack_uint4, quantize_groups, slice_groups

    column = ColumnParallelLinear(64, 48, True, torch.float32)
    row = RowParallelLinear(96, 32, False, torch.float32, tp_size=2, tp_rank=1)  # inputs 48..95 of 96
    layers = torch.nn.ModuleList([column, row])
    quantize_model(layers, QuantConfig(quant_algo="W4A16_GPTQ", group_size=32, has_zero_point=True))
    assert row.matmul.k_offset == 16
    gen = torch.Generator().manual_seed(12)
    for layer, full_in, start in ((column, 64, 0), (row, 96, 48)):
        q, scale, zero = quantize_groups(torch.randn(layer.out_features, full_in, generator=gen) * 0.1, 32, 4,
                                         torch.float32)
        local = layer.weight.shape[1] * 2
        layer.weight.data.copy_(pack_uint4(q[:, start:start + local]))
        layer.weight_scale.data.copy_(slice_groups(scale, start, local, 32))
        layer.weight_zero.data.copy_(slice_groups(zero, start, local, 32))
    column.bias.data.normal_(generator=gen)
    torch_matmuls = [layer.matmul for layer in layers]
    layers.to(DEVICE)
    assert bind_weight_only(layers) == 2
    assert all(isinstance(layer.matmul, WeightOnlyKernelMatmul) for layer in layers)
    for rows in (1, 7, FUSED_MAX_ROWS + 5):
        x = torch.randn(rows, 64, generator=gen)
        want = torch_matmuls[0](x, column.weight.cpu(), column.bias.cpu())
        got = column(x.to(DEVICE))
        assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-5)
        x = torch.randn(rows, 48, generator=gen)
        want = torch_matmuls[1](x, row.weight.cpu(), None)
        assert torch.allclose(row.matmul(x.to(DEVICE), row.weight, None).cpu(), want, rtol=1e-5, atol=1e-5)


def quantized_experts(experts: int, ffn: int, size: int, bits: int, dtype: torch.dtype, gen: torch.Generator):
    """Per-channel quantized w13 [experts, 2 ffn, size] and w2 [experts, size, ffn]: (stored, scale) of each."""
    out = []
    for shape in ((experts, 2 * ffn, size), (experts, size, ffn)):
        q, scale = quantize_per_channel(torch.randn(*shape, generator=gen) * shape[-1]**-0.5, bits, dtype)
        out += [(pack_int4(q) if bits == 4 else q).to(DEVICE), scale.to(DEVICE)]
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens, size, ffn, experts, top_k, start, config", [
    (1, 64, 32, 4, 2, 0, None), (5, 64, 48, 8, 4, 0, None), (19, 40, 24, 3, 2, 0, None),
    (70, 32, 32, 4, 2, 0, MoeConfig(16, 2, GemmTile(16, 32, 4, 2), GemmTile(32, 64, 4, 2))),
    (12, 32, 32, 4, 4, 4, None)])
def test_weight_only_fused_moe_matches_reference(bits, tokens, size, ffn, experts, top_k, start, config):
    gen = torch.Generator().manual_seed(tokens + size + ffn + bits)
    w13, s13, w2, s2 = quantized_experts(experts, ffn, size, bits, torch.float32, gen)
    x = torch.randn(tokens, size, generator=gen).to(DEVICE)
    total = experts + start
    weights, ids = torch.softmax(torch.randn(tokens, 2 * total, generator=gen), -1)[:, :total].topk(top_k, dim=-1)
    weights, ids = weights.to(DEVICE), ids.to(DEVICE)
    got = fused_moe_weight_only(x, w13, s13, w2, s2, weights, ids, start, bits, config=config)
    want = reference.fused_moe_weight_only(x.cpu(), w13.cpu(), s13.cpu(), w2.cpu(), s2.cpu(), weights.cpu(),
                                           ids.cpu(), start, bits)
    assert torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-5), (got.cpu() - want).abs().max()


def test_weight_only_fused_moe_refuses_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    w13, s13, w2, s2 = quantized_experts(2, 16, 32, 4, torch.float32, gen)
    x = torch.randn(3, 32, generator=gen).to(DEVICE)
    weights, ids = torch.rand(3, 2).to(DEVICE), torch.tensor([[0, 1]] * 3).to(DEVICE)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        fused_moe_weight_only(x, w13, s13, w2, s2, weights, ids, 0, 3)
    with pytest.raises(ValueError, match="w13 must have shape"):
        fused_moe_weight_only(x, w13, s13, w2, s2, weights, ids, 0, 8)
    with pytest.raises(ValueError, match="w2_scale must have shape"):
        fused_moe_weight_only(x, w13, s13, w2, s2[:, :4], weights, ids, 0, 4)


@pytest.mark.parametrize("fmt", [WeightOnlyFormat(4), WeightOnlyFormat(8), WeightOnlyFormat(4, 128, 64),
                                 WeightOnlyFormat(8, 64, 0)])
def test_every_candidate_config_computes_the_same(fmt):
    """Each config the build may choose (tiles, split-K, stages) gives the reference result, at 1 and 40 rows."""
    from kiln.kernels.triton_weight_only_configs import candidate_wo_configs

    gen = torch.Generator().manual_seed(21)
    n, k = 40, 512
    weight, scale, zero, dense = stored_weight(fmt, n, k, gen)
    for rows in (1, 40):
        x = torch.randn(rows, k, generator=gen)
        want = x.double() @ dense.T
        for config in candidate_wo_configs(rows, fmt.bits, fmt.group_size)[::2]:  # half of them: interpreter time
            _close(weight_only_matmul(_dev(x), _dev(weight), _dev(scale), _dev(zero), None, fmt, config), want)


@pytest.mark.parametrize("fmt, n, k, block_k, split", [
    (WeightOnlyFormat(4), 37, 512, 256, 0), (WeightOnlyFormat(4), 20, 300, 256, 2), (WeightOnlyFormat(8), 33, 200, 128, 0),
    (WeightOnlyFormat(4, 128, 0), 18, 384, 128, 3), (WeightOnlyFormat(4, 64, 16), 24, 250, 64, 0),
    (WeightOnlyFormat(8, 32, 8), 9, 150, 32, 2)])
@pytest.mark.parametrize("bias, stages, last_reduces", [(False, 2, True), (True, 1, True), (True, 2, False)])
def test_one_row_fma_kernel_matches_dequantized_reference(fmt, n, k, block_k, split, bias, stages, last_reduces,
                                                          monkeypatch):
    """The one-row kernel (config.gemv: bf16 x read as int32 pairs for INT4, the high nibble as 16 q against x / 16)
    against x @ dequant(W).T in float64: per channel and group-wise with zeros, k_offset, ragged K, split K; with
    the next tile prefetched (stages 2) and without (1); split K summed by the kernel's last program per column
    block (its counters back to 0 after) or by the second kernel."""
    from kiln.kernels import triton_gemv
    from kiln.kernels.triton_common import split_counters
    from kiln.kernels.triton_weight_only_configs import WoConfig

    monkeypatch.setattr(triton_gemv, "LAST_PROGRAM_REDUCES", last_reduces)

    gen = torch.Generator().manual_seed(n + k + block_k + split + fmt.bits)
    weight, scale, zero, dense = stored_weight(fmt, n, k, gen)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    config = WoConfig(32 if n > 20 else 16, block_k, split, 4, stages, gemv=True)
    got = weight_only_matmul(_dev(x), _dev(weight), _dev(scale), _dev(zero), _dev(b), fmt, config)
    want = x.double() @ dense.T + (0 if b is None else b.double())
    assert got.dtype == torch.bfloat16
    # fp32 sums rounded once to bf16 (2^-8 relative), of terms up to ~|x| |w| k
    assert torch.allclose(got.cpu().double(), want, rtol=8e-3, atol=8e-3 * want.abs().max().item())
    assert int(split_counters(DEVICE).count_nonzero()) == 0


def test_config_table_round_trip_and_defaults():
    from kiln.kernels import triton_weight_only_configs as wc

    entries = [wc.entry_to_dict(1, (64, 128, 4, 0), wc.WoConfig(32, 128, 2, 4, 3), True, 5.0, 9.0),
               wc.entry_to_dict(32, (64, 128, 4, 0), wc.WoConfig(128, 64, 0, 8, 3), True),
               wc.entry_to_dict(2, (64, 128, 4, 0), None, False)]
    table = wc.table_from_entries(entries)
    assert table == {(1, 64, 128, 4, 0): wc.WoConfig(32, 128, 2, 4, 3),
                     (32, 64, 128, 4, 0): wc.WoConfig(128, 64, 0, 8, 3)}
    configs = wc.rows_configs(table, 64, 128, 4, 0)
    assert configs[1] == wc.WoConfig(32, 128, 2, 4, 3) and configs[17] == configs[32] == wc.WoConfig(128, 64, 0, 8, 3)
    assert configs[2] == wc.default_wo_config(2, 4, 0, 128) and len(configs) == FUSED_MAX_ROWS + 1
    assert wc.default_wo_config(1, 4, 0, 13696).block_k == 128  # Baichuan-13B's ffn: whole tiles
    assert wc.default_wo_config(1, 4, 0, 4096).block_k == 256
    with pytest.raises(ValueError, match="block_k must divide the group size"):
        wc.table_from_entries([wc.entry_to_dict(1, (64, 128, 4, 32), wc.WoConfig(32, 64, 0, 4, 3), True)])
    with pytest.raises(ValueError, match="split_k must be an integer"):
        wc.table_from_entries([{**entries[0], "config": [32, 128, -1, 4, 3]}])
    gemv = wc.WoConfig(64, 256, 0, 4, 4, gemv=True)
    assert wc.config_from_list(wc.config_to_list(gemv), "c") == gemv and wc.config_to_list(gemv)[-1] == 1
    assert wc.config_from_list([32, 128, 2, 4, 3], "c") == wc.WoConfig(32, 128, 2, 4, 3)  # engines built before gemv
    with pytest.raises(ValueError, match="gemv must be 0 or 1"):
        wc.config_from_list([32, 128, 2, 4, 3, 2], "c")
    assert any(c.gemv for c in wc.candidate_wo_configs(1, 4, 128)) and not any(
        c.gemv for c in wc.candidate_wo_configs(2, 4, 0))


def test_quantized_build_records_weight_only_shapes(tmp_path):
    """A quantized engine's build lists its quantized weight shapes under kernels.weight_only (untuned on the CPU:
    the default configs) and times no GEMV for them; loading on the CPU binds nothing."""
    import json

    from kiln.cli.main import main as kiln_main
    from kiln.kernels import engine_weight_only_table

    assert kiln_main(["convert", "--preset", "mpt-tiny", "--num_layers", "1", "--dtype", "float32", "--output_dir",
                      str(tmp_path / "ckpt"), "--use_weight_only", "--weight_only_precision", "int4"]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                      "--max_batch_size", "2", "--max_input_len", "8", "--max_seq_len", "16"]) == 0
    config = json.loads((tmp_path / "engine" / "config.json").read_text())
    kernels = config["kernels"]
    shapes = {(e["n"], e["k"], e["bits"], e["group_size"]) for e in kernels["weight_only"]["entries"]}
    assert shapes and all(bits == 4 and group == 0 for _, _, bits, group in shapes)
    assert not any(e["tuned"] for e in kernels["weight_only"]["entries"])
    linear = {(e["n"], e["k"]) for e in kernels["linear"]["entries"]}
    assert len(linear) == 1  # only the (unquantized) LM head is timed for the bf16 GEMV
    assert engine_weight_only_table(config, torch.device("cpu")) == {}
