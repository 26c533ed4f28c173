"""The Triton fused MoE over group-wise INT4/8-bit experts (kiln/kernels/triton_moe_group_wise*.py) through Triton's
interpreter on the CPU against the torch reference (reference.fused_moe_group_wise): odd expert counts, expert
parallel ranges, w2 slices starting mid-group (k_offset != 0), group sizes 32..128, float32 and bfloat16; and its
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
    interpret_triton(("kiln.kernels.triton_jit_common", "kiln.kernels.triton_weight_only_kernels",
                      "kiln.kernels.triton_moe_kernels", "kiln.kernels.triton_moe",
                      "kiln.kernels.triton_moe_group_wise_kernels", "kiln.kernels.triton_moe_group_wise"))

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton_moe import GemmTile, MoeConfig  # noqa: E402
from kiln.kernels.triton_moe_group_wise import fused_moe_group_wise  # noqa: E402
from kiln.quant.group_wise import num_groups, pack_values  # noqa: E402


def random_experts(experts: int, rows: int, cols: int, bits: int, group: int, k_offset: int, dtype: torch.dtype,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random stored weight [experts, rows, cols (/2)], scale and zero [experts, rows, groups]: q uniform, integer
    zeros, scales near 1 / (2^bits * sqrt(cols)) so the activations stay of order one."""
    groups = num_groups(cols, group, k_offset)
    top = 2**bits
    q = torch.randint(0, top, (experts, rows, cols), generator=gen)
    scale = ((torch.rand(experts, rows, groups, generator=gen) + 0.5) * 4 / (top * cols**0.5)).to(dtype)
    zero = torch.randint(0, top, (experts, rows, groups), generator=gen).to(dtype)
    return pack_values(q, bits).to(DEVICE), scale.to(DEVICE), zero.to(DEVICE)


def run_both(tokens, size, ffn, experts, top_k, start, bits, group, k2, dtype, config=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13, s13, z13 = random_experts(experts, 2 * ffn, size, bits, group, 0, dtype, gen)
    w2, s2, z2 = random_experts(experts, size, ffn, bits, group, k2, dtype, gen)
    x = torch.randn(tokens, size, generator=gen).to(dtype).to(DEVICE)
    total = experts + start
    weights, ids = torch.softmax(torch.randn(tokens, 2 * total, generator=gen), -1)[:, :total].topk(top_k, dim=-1)
    args = (w13, s13, z13, w2, s2, z2, weights.to(DEVICE), ids.to(DEVICE), start, bits, group, 0, k2)
    got = fused_moe_group_wise(x, *args, config=config)
    want = reference.fused_moe_group_wise(x.cpu(), *(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    return got.cpu(), want


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tokens, size, ffn, experts, top_k, start, group, k2, config", [
    (1, 64, 32, 4, 2, 0, 32, 0, None),
    (5, 64, 48, 3, 2, 0, 32, 16, None),  # odd expert count, w2's slice starts half a group in
    (19, 128, 84, 5, 2, 0, 64, 42, None),  # ffn = 1.3 groups of 64 starting mid-group (DBRX tp 8 in miniature)
    (12, 128, 64, 4, 4, 4, 128, 64, None),  # expert parallel: this rank holds experts 4..7
    (70, 64, 96, 3, 2, 1, 32, 0, MoeConfig(16, 2, GemmTile(16, 32, 4, 2), GemmTile(32, 64, 4, 2)))])
def test_matches_the_torch_reference(bits, tokens, size, ffn, experts, top_k, start, group, k2, config):
    got, want = run_both(tokens, size, ffn, experts, top_k, start, bits, group, k2, torch.float32, config,
                         seed=tokens + ffn + bits)
    assert want.abs().max() > 0.05  # the test would see a wrong kernel
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


def test_bfloat16_matches_the_reference_within_rounding():
    got, want = run_both(9, 128, 84, 3, 2, 0, 4, 128, 44, torch.bfloat16, seed=3)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want.float()).abs().max()
    assert err <= 0.02 * want.float().abs().max(), err


def test_refuses_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    w13, s13, z13 = random_experts(2, 32, 64, 4, 32, 0, torch.float32, gen)
    w2, s2, z2 = random_experts(2, 64, 16, 4, 32, 0, torch.float32, gen)
    x = torch.randn(3, 64, generator=gen).to(DEVICE)
    weights, ids = torch.rand(3, 2).to(DEVICE), torch.tensor([[0, 1]] * 3).to(DEVICE)
    base = (x, w13, s13, z13, w2, s2, z2, weights, ids, 0)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        fused_moe_group_wise(*base, 3, 32)
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        fused_moe_group_wise(*base, 4, 48)
    with pytest.raises(ValueError, match="w2_k_offset must be"):
        fused_moe_group_wise(*base, 4, 32, 0, 33)
    with pytest.raises(ValueError, match="w2_scale must have shape"):
        fused_moe_group_wise(*base, 4, 32, 0, 16)  # a mid-group slice stores one more group column
    with pytest.raises(ValueError, match="w13_zero must have shape"):
        fused_moe_group_wise(x, w13, s13, z13[:, :, :1], w2, s2, z2, weights, ids, 0, 4, 32)


def test_group_wise_moe_engines_may_capture_graphs():
    """The triton set binds this kernel, so a group-wise MoE engine keeps CUDA graphs there; the torch set's
    reference reads expert ids on the host, so it does not."""
    from types import SimpleNamespace

    from kiln.executor.model_runner import graphs_allowed
    from kiln.kernels import REFERENCE
    from kiln.kernels.triton_ops import triton_kernels

    assert triton_kernels().fused_moe_group_wise is fused_moe_group_wise
    for algo in ("W4A16_AWQ", "W4A16_GPTQ", "W4A16"):
        info = SimpleNamespace(quant=SimpleNamespace(quant_algo=algo), model=SimpleNamespace(is_moe=True))
        assert graphs_allowed(info, triton_kernels())
        assert not graphs_allowed(info, REFERENCE)
        assert not graphs_allowed(info)


@pytest.mark.parametrize("moe_tp, moe_ep, rank", [(2, 1, 1), (1, 2, 1)])
def test_a_quantized_dbrx_moe_runs_this_kernel_like_the_reference(moe_tp, moe_ep, rank):
    """The wiring: a dbrx-tiny MoE quantized group-wise (group 32) on one rank of an expert tensor- or expert-parallel
    split (ffn 96 / 2 = 48 per rank: rank 1's w2 slice starts 16 into a group, k_offset 16), its experts run through
    the triton kernel set and through the torch one."""
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
    quantize_model(moe, QuantConfig(quant_algo="W4A16_AWQ", group_size=32))
    assert moe.w2.k_offset == (16 if moe_tp == 2 else 0)
    gen = torch.Generator().manual_seed(rank + moe_tp)
    for name in ("w13", "w2"):
        stored, scale, zero = (getattr(moe, name + s) for s in ("", "_scale", "_zero"))
        rows, cols = stored.shape[1], stored.shape[2] * 2
        q, s, z = random_experts(stored.shape[0], rows, cols, 4, 32, stored.k_offset, torch.float32, gen)
        for param, value in ((stored, q), (scale, s), (zero, z)):
            param.data.copy_(value.cpu())
    x = torch.randn(6, config.hidden_size, generator=gen)
    weights, ids = torch.softmax(torch.randn(6, config.moe_num_experts, generator=gen), -1).topk(2, dim=-1)
    want = moe.run_experts(REFERENCE, x, weights, ids)
    got = moe.to(DEVICE).run_experts(triton_kernels(), x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE))
    assert want.abs().max() > 0.05
    assert torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-5), (got.cpu() - want).abs().max()
