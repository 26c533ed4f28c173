"""Weight-only per-channel INT8 (W8A16) and INT4 (W4A16): the recipe on fixed tensors, the layers, whole tiny models
of every family against a dequantized-weights reference, tp 2 against tp 1, rank-file sizes and bad input.

The reference quantizer here is written from TensorRT-LLM's description (../shared/docs/quantization.md 1.3: per output
channel scale = amax / 2^(bits-1), q = clamp(round(w / scale)), INT4 two per byte, low nibble first), not from kiln's
functions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import kiln
from fixtures_baichuan import BaichuanReference, make_baichuan_checkpoint
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, reference_greedy, reference_logits, \
    save_checkpoint
from kiln.cli.main import main as kiln_main
from kiln.kernels.reference import fused_moe, fused_moe_weight_only
from kiln.layers.linear import ColumnParallelLinear, RowParallelLinear
from kiln.quant.weight_only import dequantize, pack_int4, quantize_per_channel, unpack_int4

PRECISIONS = {"int8": 8, "int4": 4}
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61))]
GREEDY = kiln.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def ref_quant(w: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Fake-quantized w (float64 result): per channel, reducing over `dim` (the input dimension of the matmul);
    scale and rounding in float32, as TensorRT-LLM's quantizer computes them."""
    qmax = 2 ** (bits - 1)
    w = w.float()
    scale = w.abs().amax(dim=dim, keepdim=True) / qmax
    q = torch.clamp(torch.round(w / torch.where(scale == 0, 1.0, scale)), -qmax, qmax - 1)
    return q.double() * scale.double()


# ---------------------------------------------------------------------------------------------------------- recipe

def test_int8_exact_values_and_scales():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.25, 0.5, -1.0, 0.75], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_per_channel(w, 8, torch.float32)
    assert scale.tolist() == [2 / 128, 1 / 128, 0.0]
    assert q.dtype == torch.int8 and q.tolist() == [[64, -128, 32, 0], [32, 64, -128, 96], [0, 0, 0, 0]]
    assert torch.equal(dequantize(q, scale, 8, torch.float32), w)  # every value here is on the grid


def test_int4_exact_values_packing_and_clipping():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [2.0, -1.0, 0.25, -0.25]])
    q, scale = quantize_per_channel(w, 4, torch.float32)
    assert scale.tolist() == [0.25, 0.25]
    assert q.tolist() == [[4, -8, 2, 0], [7, -4, 1, -1]]  # +amax rounds to 8 and is clipped to 7 (TensorRT-LLM)
    packed = pack_int4(q)
    # Independent packing: byte i = (q[2i] & 0xF) | (q[2i+1] & 0xF) << 4, as an int8.
    want = [[struct.unpack("b", bytes([(a & 0xF) | ((b & 0xF) << 4)]))[0] for a, b in zip(row[0::2], row[1::2])]
            for row in q.tolist()]
    assert packed.dtype == torch.int8 and packed.tolist() == want == [[-124, 2], [-57, -15]]
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_random_round_trip_error_is_half_a_step(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(3, 16, 64, generator=gen) * torch.rand(3, 16, 1, generator=gen)  # experts-shaped, varied rows
    q, scale = quantize_per_channel(w, bits, torch.float32)
    stored = pack_int4(q) if bits == 4 else q
    back = dequantize(stored, scale, bits, torch.float32)
    assert torch.allclose(back.double(), ref_quant(w, bits), rtol=1e-6, atol=0)
    err, step = (back - w).abs(), scale.unsqueeze(-1)
    clipped = w > (2 ** (bits - 1) - 0.5) * step  # only a row's largest positive values are clipped, by < 1 step
    slack = 1e-6 * w.abs()  # float32 rounding of w / scale and of q * scale
    assert (err <= step / 2 + slack)[~clipped].all()
    assert (err <= step + slack)[clipped].all()
    assert clipped.any() or bits == 8  # the INT4 case does exercise the clip


# ----------------------------------------------------------------------------------------------------------- layers

@pytest.mark.parametrize("bits", [8, 4])
def test_linear_layers_compute_x_times_dequantized_weight(bits):
    from kiln.config import QuantConfig
    from kiln.quant.apply import quantize_model

    layers = torch.nn.ModuleList([ColumnParallelLinear(32, 24, True, torch.float32),
                                  RowParallelLinear(24, 16, False, torch.float32)])
    assert quantize_model(layers, QuantConfig(quant_algo="W8A16" if bits == 8 else "W4A16")) == 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=gen)  # [tokens, in]
    for layer in layers:
        w = torch.randn(layer.out_features, layer.in_features, generator=gen)
        q, scale = quantize_per_channel(w, bits, torch.float32)
        assert layer.weight.dtype == torch.int8 and layer.weight.shape[-1] == layer.in_features * bits // 8
        layer.weight.data.copy_(pack_int4(q) if bits == 4 else q)
        layer.weight_scale.data.copy_(scale)
        if layer.bias is not None:
            layer.bias.data.normal_(generator=gen)
        want = x.double() @ ref_quant(w, bits).T + (0 if layer.bias is None else layer.bias.double())
        got = layer(x)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
        x = got


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_moe_reference_dequantizes_each_expert(bits):
    gen = torch.Generator().manual_seed(1)
    experts, ffn, hidden, tokens = 4, 6, 8, 7
    w13, w2 = torch.randn(experts, 2 * ffn, hidden, generator=gen), torch.randn(experts, hidden, ffn, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    weights = torch.rand(tokens, 2, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(tokens)])
    (q13, s13), (q2, s2) = quantize_per_channel(w13, bits, torch.float32), quantize_per_channel(w2, bits, torch.float32)
    pack = pack_int4 if bits == 4 else (lambda t: t)
    got = fused_moe_weight_only(x, pack(q13), s13, pack(q2), s2, weights, ids, 0, bits)
    want = fused_moe(x, ref_quant(w13, bits).float(), ref_quant(w2, bits).float(), weights, ids, 0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- whole tiny models

def convert_build(tmp: Path, model_dir: Path, *extra: str) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), "--dtype",
                      "float32", *extra]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    return tmp / "engine"


def wo_flags(precision: str) -> tuple[str, ...]:
    return ("--use_weight_only", "--weight_only_precision", precision)


def fake_quant_state(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The published state with every quantized linear weight ([out, in]) replaced by its dequantized values;
    embeddings, LM head, norms and routers as they are."""
    keep = ("wte", "embed", "lm_head", "router", "norm")
    return {name: ref_quant(w, bits).float() if w.dim() == 2 and name.endswith(".weight")
            and not any(k in name for k in keep) else w for name, w in state.items()}


def fake_quant_dbrx(model: torch.nn.Module, cfg: dict, bits: int) -> None:
    """transformers' DBRX with its dequantized weights: attention per output row; experts' w1/v1 ([E * ffn, hidden],
    rows are outputs) per row, w2 ([E * ffn, hidden] used as inter @ w2_e) per hidden column of each expert."""
    experts, ffn = cfg["ffn_config"]["moe_num_experts"], cfg["ffn_config"]["ffn_hidden_size"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("Wqkv.weight", "out_proj.weight", "mlp.w1", "mlp.v1")):
                p.copy_(ref_quant(p, bits))
            elif name.endswith("mlp.w2"):
                w2 = p.view(experts, ffn, p.shape[-1])
                p.copy_(ref_quant(w2, bits, dim=1).reshape(p.shape))


def check_scores(engine: Path, reference, greedy) -> None:
    """kiln's logits equal the dequantized reference's within fp32 tolerance; greedy tokens are identical."""
    with kiln.LLM(engine, device="cpu") as llm:
        for prompt in PROMPTS:
            got, want = llm.score(prompt).double(), reference(prompt).double()
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        tokens = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY)]
    assert tokens == [greedy(p) for p in PROMPTS]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_mpt_matches_dequantized_reference(precision, tmp_path):
    cfg = mpt_published_config()
    state = published_state(hf_mpt_model(cfg))
    engine = convert_build(tmp_path, save_checkpoint(state, cfg, tmp_path / "hf"), *wo_flags(precision))
    config = json.loads((engine / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == {"int8": "W8A16", "int4": "W4A16"}[precision]
    deq = fake_quant_state(state, PRECISIONS[precision])
    assert not torch.equal(deq["transformer.blocks.0.ffn.up_proj.weight"],
                           state["transformer.blocks.0.ffn.up_proj.weight"])
    check_scores(engine, lambda p: reference_logits(deq, cfg, p), lambda p: reference_greedy(deq, cfg, p, 6))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_baichuan_matches_dequantized_reference(precision, tmp_path):
    hf_dir, state, cfg = make_baichuan_checkpoint(tmp_path, "v2_13b")
    engine = convert_build(tmp_path, hf_dir, "--model_version", "v2_13b", *wo_flags(precision))
    ref = BaichuanReference(fake_quant_state(state, PRECISIONS[precision]), cfg, "v2_13b")
    check_scores(engine, ref.logits, lambda p: ref.greedy(p, 6))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_dbrx_experts_match_dequantized_reference(precision, tmp_path):
    hf_dir, model, cfg = make_dbrx_checkpoint(tmp_path)
    engine = convert_build(tmp_path, hf_dir, *wo_flags(precision))
    fake_quant_dbrx(model, cfg, PRECISIONS[precision])

    def logits(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([prompt])).logits[0]

    def greedy(prompt: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        return out[0, len(prompt):].tolist()

    check_scores(engine, logits, greedy)
