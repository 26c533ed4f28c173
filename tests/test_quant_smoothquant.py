"""SmoothQuant W8A8 (kiln.quant.smoothquant, kiln.quant.sq_calibration): the recipe on fixed tensors; on tiny models of
every family, smoothing alone leaves the float logits unchanged, and the quantized model equals a fake-quant torch
reference written here from the recipe (../shared/docs/quantization.md, SmoothQuant: scale = amax / 127, round then
clip to ±127, per token or static per tensor, per channel or per tensor weights); tp 2 equals tp 1; bad flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import kiln
from fixtures_baichuan import make_baichuan_checkpoint
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_kv_cache import calib_text, tiny_hf_dir
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from fixtures_tokenizers import build_neox_tokenizer_dir
from kiln.checkpoint.kiln_format import load_artifact
from kiln.cli.convert_cmd import plan_from_hf
from kiln.cli.main import main as kiln_main
from kiln.config import Mapping, QuantConfig
from kiln.kernels import select_kernels
from kiln.layers.context import AttentionMetadata, ForwardContext
from kiln.layers.linear import LinearBase, ReplicatedLinear, RowParallelLinear
from kiln.layers.moe import MoE
from kiln.layers.sharding import full_shape
from kiln.quant.apply import quantize_model
from kiln.quant.kv_calibration import KVCalibration, float_model
from kiln.quant.smoothquant import SQ_ALGOS, quantize_activation, quantize_weight, sq_algo
from kiln.quant.sq_calibration import SmoothedSource, calibrate_input_amax
from kiln.tokenizer import load_tokenizer

MODES = {"tok-ch": ("--per_token", "--per_channel"), "tens-ch": ("--per_channel",), "tens-tens": (), "tok-tens": ("--per_token",)}
VERSION = {"baichuan": "v2_7b"}  # the tiny Baichuan's shapes do not say which it is
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61))]


def fake_quant(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-then-clip to ±127 at `scale` (broadcast), back to float: the reference's quantize/dequantize."""
    return torch.clamp(torch.round(v / scale), -127, 127) * scale


def ref_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    amax = w.abs().amax(dim=-1, keepdim=True) if per_channel else w.abs().amax()
    return fake_quant(w, amax / 127)


def ref_act(x: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor:
    return fake_quant(x, x.abs().amax(dim=-1, keepdim=True) / 127 if static is None else static)


# ---------------------------------------------------------------------------------------------------------- recipe

def test_weight_and_activation_values():
    w = torch.tensor([[1.27, -2.54, 0.5], [0.127, 0.0, -0.254]])
    q, scale = quantize_weight(w, True, torch.float32)
    assert torch.allclose(scale, torch.tensor([0.02, 0.002]))
    assert q.tolist() == [[64, -127, 25], [64, 0, -127]]
    q, scale = quantize_weight(w, False, torch.float32)
    assert torch.allclose(scale, torch.tensor([0.02, 0.02])) and q[1].tolist() == [6, 0, -13]
    x = torch.tensor([[1.0, -0.5], [0.0, 0.0], [300.0, 1.0]])
    q, s = quantize_activation(x, None)  # per token: an all-zero token gets scale 1
    assert q.tolist() == [[127, -64], [0, 0], [127, 0]] and s[1].item() == 1.0
    q, s = quantize_activation(x, torch.tensor([2.0 / 127]))  # static: 300 clips to 127
    assert q.tolist() == [[64, -32], [0, 0], [127, 64]]


def test_the_four_algos_are_trtllm_names():
    assert {sq_algo(t, c) for t in (False, True) for c in (False, True)} == set(SQ_ALGOS)
    assert sq_algo(True, True) == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert sq_algo(False, True) == "W8A8_SQ_PER_CHANNEL"


# ----------------------------------------------------------------------------------------------- tiny models

def tiny_dir(tmp: Path, family: str) -> Path:
    if family == "baichuan":
        return make_baichuan_checkpoint(tmp, "v2_7b")[0]
    if family == "dbrx":
        return make_dbrx_checkpoint(tmp)[0]
    cfg = mpt_published_config()
    return save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf")


def version_flags(family: str) -> list[str]:
    return ["--model_version", VERSION[family]] if family in VERSION else []


def prefill_logits(model: torch.nn.Module, ids: list[int], kernels=None) -> torch.Tensor:
    """One sequence's prefill through a kiln model on the CPU (the torch kernels unless `kernels` is given) ->
    logits [len, vocab] float32."""
    n, block = len(ids), 16
    blocks = -(-n // block)
    for attn in model.attention_layers():
        shape = (blocks, block, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.zeros(shape)
        attn.v_cache = torch.zeros(shape)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                             query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                             seq_lens=torch.tensor([n], dtype=torch.int32), max_query_len=n, max_seq_len=n)
    with torch.inference_mode():
        kernels = kernels or select_kernels(torch.device("cpu"))
        hidden = model(torch.tensor(ids), torch.arange(n), ForwardContext(kernels, meta))
        return model.compute_logits(hidden).float()


def smoothed(plan, quant: QuantConfig, amax) -> SmoothedSource:
    full = dict(quantize_model_meta(plan, quant).named_parameters())
    return SmoothedSource(plan.source, amax, quant.smoothquant_val, {n: full_shape(p) for n, p in full.items()})


def quantize_model_meta(plan, quant: QuantConfig) -> torch.nn.Module:
    with torch.device("meta"):
        model = plan.family.model_class(plan.config, Mapping())
    quantize_model(model, quant)
    return model


def random_amax(source: SmoothedSource, seed: int) -> dict[str, torch.Tensor]:
    """Calibration-like absmax with outlier channels (1 to 100), for every smoothing group of the model."""
    gen = torch.Generator().manual_seed(seed)
    amax = {}
    for layer, group, _ in source.roles.values():
        name = f"layers.{layer}.{group.weights[0]}"
        shape = source.shapes[name]
        want = (shape[0], shape[-1]) if group.per_expert else (shape[-1],)
        amax[f"layers.{layer}.{group.amax_key}"] = torch.exp(torch.rand(want, generator=gen) * 4.6)
    return amax


@pytest.mark.parametrize("family", ["mpt", "baichuan", "dbrx"])
def test_smoothing_alone_leaves_float_logits_unchanged(family, tmp_path):
    plan = plan_from_hf(str(tiny_dir(tmp_path, family)), "float32", 1, 1, VERSION.get(family))
    quant = QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", smoothquant_val=0.5)
    source = smoothed(plan, quant, None)
    source.amax = random_amax(source, 0)
    plain = float_model(plan.family, plan.config, plan.source, torch.device("cpu"))
    smooth = reference_model(plan, source, quant, rounding=False)
    changed = [n for n, p in smooth.named_parameters() if not torch.equal(p, dict(plain.named_parameters())[n])]
    assert any("input_norm" in n for n in changed) and any("qkv_proj" in n for n in changed)
    for ids in PROMPTS:
        want, got = prefill_logits(plain, ids), prefill_logits(smooth, ids)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


class FakeQuantLinear:
    """The reference of one quantized linear layer: float weight W*s, x times the smoother, both fake-quantized
    (`rounding` False: smoothing alone, nothing rounded)."""

    def __init__(self, w: torch.Tensor, act: torch.Tensor | None, smoother, per_channel: bool, rounding: bool):
        self.w = ref_weight(w, per_channel) if rounding else w
        self.act, self.smoother, self.rounding = act, smoother, rounding

    def __call__(self, x, weight, bias):
        xs = x if self.smoother is None else x * self.smoother
        return F.linear(ref_act(xs, self.act) if self.rounding else xs, self.w, bias)


def fake_quant_experts(w13, w2, act13, act2, smoother2, per_channel: bool, rounding: bool):
    """The reference MoE: per token and chosen expert, fake-quantized input, GLU, smoothed fake-quantized act."""
    q13 = torch.stack([ref_weight(w, per_channel) for w in w13]) if rounding else w13
    q2 = torch.stack([ref_weight(w, per_channel) for w in w2]) if rounding else w2

    def ref_act(v, static):
        return globals()["ref_act"](v, static) if rounding else v

    def run(kernels, x, weights, ids):
        xq = ref_act(x, act13)
        out = torch.zeros_like(x)
        ffn = q13.shape[1] // 2
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                gu = q13[e] @ xq[t]
                a = F.silu(gu[:ffn]) * gu[ffn:] * smoother2[e]
                a = ref_act(a[None], None if act2 is None else act2[e])[0]
                out[t] += weights[t, k] * (q2[e] @ a)
        return out
    return run


def reference_model(plan, source: SmoothedSource, quant: QuantConfig, rounding: bool = True) -> torch.nn.Module:
    """The float model on the smoothed tensors, each quantized layer replaced by its fake-quant reference (rounding
    False: its runtime smoother only)."""
    per_token, per_channel = SQ_ALGOS[quant.quant_algo]
    model = float_model(plan.family, plan.config, source, torch.device("cpu"))

    def get(name):
        return source.full_tensor(name, source.shapes[name]).float()
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and not isinstance(module, ReplicatedLinear):
            act = None if per_token else get(name + ".act_scale")
            smoother = get(name + ".smoother") if isinstance(module, RowParallelLinear) else None
            module.matmul = FakeQuantLinear(module.weight.float(), act, smoother, per_channel, rounding)
        elif isinstance(module, MoE):
            module.run_experts = fake_quant_experts(
                module.w13.float(), module.w2.float(), None if per_token else get(name + ".w13_act_scale"),
                None if per_token else get(name + ".w2_act_scale"), get(name + ".w2_smoother"), per_channel,
                rounding)
    return model


def quantized_model(ckpt: Path) -> torch.nn.Module:
    """The tp-1 quantized kiln model with its checkpoint's tensors."""
    artifact = load_artifact(ckpt, "checkpoint")
    model = artifact.family.model_class(artifact.model, Mapping())
    quantize_model(model, artifact.quant)
    tensors = load_file(str(ckpt / "rank0.safetensors"))
    for name, param in model.named_parameters():
        param.data.copy_(tensors[name])
    return model.eval()


def calibrated_dir(tmp: Path, family: str) -> Path:
    """A tiny checkpoint with a GPT-NeoX style tokenizer (vocabulary 512), for calibration."""
    if family != "baichuan":
        return tiny_hf_dir(tmp, family)
    hf = make_baichuan_checkpoint(tmp, "v2_7b", vocab_size=512)[0]
    build_neox_tokenizer_dir(tmp / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp / "tok" / name, hf / name)
    return hf


@pytest.mark.parametrize("family, mode", [("mpt", "tok-ch"), ("mpt", "tens-tens"), ("dbrx", "tens-ch"),
                                          ("dbrx", "tok-ch"), ("baichuan", "tok-tens"), ("baichuan", "tens-ch")])
def test_quantized_model_equals_fake_quant_reference(family, mode, tmp_path):
    hf, text = calibrated_dir(tmp_path, family), calib_text(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert kiln_main(["convert", "--model_dir", str(hf), "--output_dir", str(ckpt), "--dtype", "float32",
                      "--smoothquant", "0.5", *MODES[mode], "--calib_size", "4", "--calib_max_seq_length", "32",
                      "--calib_dataset", str(text), *version_flags(family)]) == 0
    config = json.loads((ckpt / "config.json").read_text())
    quant = QuantConfig(**config["quantization"])
    assert quant.quant_algo == sq_algo("--per_token" in MODES[mode], "--per_channel" in MODES[mode])
    assert config["provenance"]["smoothquant_calibration"]["samples"] == 4
    model = quantized_model(ckpt)
    assert model.layers["0"].attn.qkv_proj.weight.dtype == torch.int8
    plan = plan_from_hf(str(hf), "float32", 1, 1, VERSION.get(family))
    source = smoothed(plan, quant, None)
    source.amax = calibrate_input_amax(plan.family, plan.config, plan.source, load_tokenizer(str(hf)),
                                       KVCalibration(dataset=str(text), num_samples=4, max_seq_len=32), False)[0]
    ref = reference_model(plan, source, quant)
    plain = float_model(plan.family, plan.config, plan.source, torch.device("cpu"))
    for ids in PROMPTS:
        want, got = prefill_logits(ref, ids), prefill_logits(model, ids)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        assert not torch.allclose(got, prefill_logits(plain, ids), atol=1e-4)  # the rounding is really there


# ------------------------------------------------------------------------------------------ tensor parallel, flags

def scores_and_tokens(engine: Path) -> tuple[list[torch.Tensor], list[list[int]]]:
    greedy = kiln.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    with kiln.LLM(engine, device="cpu") as llm:
        return [llm.score(p) for p in PROMPTS], [r.outputs[0].token_ids for r in llm.generate(PROMPTS, greedy)]


def sq_engine(tmp: Path, hf: Path, text: Path, mode: str, *extra: str) -> Path:
    assert kiln_main(["convert", "--model_dir", str(hf), "--output_dir", str(tmp / "ckpt"), "--dtype", "float32",
                      "--smoothquant", "0.5", *MODES[mode], "--calib_size", "4", "--calib_max_seq_length", "32",
                      "--calib_dataset", str(text), *extra]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_batch_size", "4", "--max_input_len", "32", "--max_seq_len", "64"]) == 0
    return tmp / "engine"


TP2 = ("--tp_size", "2")


@pytest.mark.parametrize("family, mode, extra", [
    ("mpt", "tens-ch", TP2),  # static activation scales: every rank quantizes exactly as one rank does
    ("dbrx", "tens-ch", TP2),  # experts tensor parallel: w13 rows, w2's ffn and its smoother split
    ("dbrx", "tens-tens", (*TP2, "--moe_tp_mode", "1")),  # expert parallel: whole experts, smoothers, scales
    ("baichuan", "tok-ch", ("--pp_size", "2")),  # pipeline stages: each its own layers' smoothing
    ("mpt", "tok-ch", TP2),  # per token: a row-parallel layer's scale is over its rank's slice (close, not equal)
])
def test_parallel_equals_one_rank(family, mode, extra, tmp_path):
    hf, text = calibrated_dir(tmp_path, family), calib_text(tmp_path)
    one = scores_and_tokens(sq_engine(tmp_path / "tp1", hf, text, mode, *version_flags(family)))
    two = scores_and_tokens(sq_engine(tmp_path / "tp2", hf, text, mode, *version_flags(family), *extra))
    # Per token, each rank's o_proj/down_proj input slice has its own scales: rounding differs at the level of the
    # quantization noise itself (these random tiny models' logits move by ~0.05 under it).
    tol = 0.15 if "--per_token" in MODES[mode] and "--tp_size" in extra else 1e-4
    for a, b in zip(two[0], one[0]):
        assert (a - b).abs().max().item() < tol
    if tol < 1e-3:
        assert two[1] == one[1]


def test_quantize_int8_sq_and_bad_alpha(tmp_path, capsys):
    hf, text = calibrated_dir(tmp_path, "mpt"), calib_text(tmp_path)
    assert kiln_main(["quantize", "--model_dir", str(hf), "--output_dir", str(tmp_path / "q"), "--qformat", "int8_sq",
                      "--calib_size", "2", "--calib_max_seq_length", "16", "--calib_dataset", str(text)]) == 0
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["smoothquant_val"]) == ("W8A8_SQ_PER_CHANNEL", 0.5)
    assert kiln_main(["convert", "--model_dir", str(hf), "--output_dir", str(tmp_path / "x"), "-sq", "high"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "kiln convert: error: --smoothquant takes the smoothing alpha, a number in [0, 1] (e.g. 0.5), got 'high'")
