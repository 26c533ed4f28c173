"""FP8 (e4m3) weights and activations: the recipe on fixed tensors, the matmul, whole tiny models of every family
against transformers / the Baichuan reference with independently fake-quantized weights and activations, the
calibrated static input scales, shared fused scales, tp 2 against tp 1, flags and bad input.

The reference quantizer is written from the format's description (../shared/docs/quantization.md; vLLM's FP8):
scale = amax / 448, q = float8_e4m3fn(clamp(x / scale, -448, 448)), dequantized q * scale; per tensor (per expert)
or per output channel; activations per token (amax of the row) or with one static calibrated scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import kiln
from fixtures_baichuan import BaichuanReference, make_baichuan_checkpoint
from fixtures_dbrx import dbrx_published_config, hf_dbrx_model, hf_scorers
from fixtures_kv_cache import calib_text, convert_build, tiny_hf_dir
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from kiln.cli.main import main as kiln_main
from kiln.quant.fp8 import FP8_SCHEMES, quantize_weight
from kiln.quant.fp8_layers import FP8Matmul, fused_moe_fp8
from kiln.quant.kv_calibration import KVCalibration, calibration_windows
from kiln.tokenizer import load_tokenizer

E4M3 = torch.float8_e4m3fn
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], list(range(40, 61))]
GREEDY = kiln.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
STATIC = ("--enable_fp8",)
DYNAMIC = ("--enable_fp8", "--per_channel", "--per_token")
CALIB = ("--calib_size", "4", "--calib_max_seq_length", "32")


def ref_fq(w: torch.Tensor, dim=None) -> torch.Tensor:
    """Fake-quantized w: scale = amax over `dim` (None: the whole tensor) / 448."""
    amax = w.abs().amax() if dim is None else w.abs().amax(dim=dim, keepdim=True)
    scale = amax.float() / 448
    return ((w.float() / scale).clamp(-448, 448).to(E4M3).float() * scale).to(w.dtype)


def ref_fq_act(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """An activation as the FP8 GEMM sees it: per token (scale None) or with the static scale."""
    return ref_fq(x, dim=-1) if scale is None else \
        ((x.float() / scale).clamp(-448, 448).to(E4M3).float() * scale).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------- recipe

def test_exact_values_per_tensor_and_per_channel():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.25, 3.5, -1.0, 0.75]])
    q, scale = quantize_weight(w, per_channel=False, scale_dtype=torch.float32)
    assert scale.tolist() == [3.5 / 448] and q.dtype == E4M3
    assert q.float().tolist() == [[128, -256, 64, 0], [32, 448, -128, 96]]
    assert torch.equal(q.float() * scale, w)  # every value is on the grid
    q, scale = quantize_weight(w, per_channel=True, scale_dtype=torch.float32)
    assert scale.tolist() == torch.tensor([2 / 448, 3.5 / 448]).tolist()  # amax / 448 in float32
    assert q.float()[0].tolist() == [224, -448, 112, 0]


def test_rounding_matches_the_reference_and_stays_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen) * torch.rand(16, 1, generator=gen)
    for per_channel, dim in ((False, None), (True, -1)):
        q, scale = quantize_weight(w, per_channel, torch.float32)
        back = q.float() * scale.unsqueeze(-1)
        assert torch.allclose(back, ref_fq(w, dim), rtol=1e-6, atol=0)
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values
        normal = (w / scale.unsqueeze(-1)).abs() >= 2 ** -6
        assert ((back - w).abs() <= w.abs() * 2 ** -4 + 1e-9)[normal].all()


@pytest.mark.parametrize("algo", sorted(FP8_SCHEMES))
def test_matmul_reference_is_fake_quantized_x_times_dequantized_w(algo):
    scheme = FP8_SCHEMES[algo]
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(5, 32, generator=gen), torch.randn(24, 32, generator=gen) * 0.1, torch.randn(24)
    q, scale = scheme.quantize(w, torch.float32)
    static = None if scheme.dynamic else torch.tensor([x.abs().max().item() * 0.8 / 448])  # clips the largest
    got = FP8Matmul(scheme, scale, static, use_scaled_mm=False)(x, q, b)
    wq = ref_fq(w, -1 if scheme.per_channel else None)
    want = ref_fq_act(x, None if static is None else static.item()) @ wq.T + b
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_matmul_path_is_chosen_on_the_placed_weight(monkeypatch):
    """An engine's model is built (and quantized) on the meta device and placed after: the FP8 GEMM or the reference
    is chosen at the first call, from the weight it is called with, not when the layer is made."""
    from kiln.quant import fp8_layers

    scheme = FP8_SCHEMES[sorted(FP8_SCHEMES)[0]]
    q, scale = scheme.quantize(torch.randn(16, 32) * 0.1, torch.float32)
    seen = []
    monkeypatch.setattr(fp8_layers, "fp8_gemm_available", lambda device: seen.append(device.type) or False)
    mm = FP8Matmul(scheme, scale, None if scheme.dynamic else torch.tensor([0.01]))
    assert mm.run is None and not seen
    mm(torch.randn(3, 32), q, None)
    assert seen == ["cpu"] and getattr(mm.run, "__func__", None) is FP8Matmul.reference


def test_fused_moe_quantizes_input_and_intermediate():
    gen = torch.Generator().manual_seed(2)
    x, w13, w2 = torch.randn(6, 16, generator=gen), torch.randn(3, 20, 16, generator=gen), torch.randn(3, 16, 10)
    scheme = FP8_SCHEMES["FP8"]
    q13, s13 = scheme.quantize(w13, torch.float32)
    q2, s2 = scheme.quantize(w2, torch.float32)
    ids = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1]])
    weights = torch.rand(6, 2, generator=gen)
    got = fused_moe_fp8(x, q13, s13, q2, s2, None, weights, ids, 0)
    want = torch.zeros(6, 16)
    for t in range(6):
        for k in range(2):
            e = ids[t, k].item()
            gu = ref_fq_act(x[t:t + 1], None) @ ref_fq(w13[e]).T
            act = F.silu(gu[:, :10]) * gu[:, 10:]
            want[t] += weights[t, k] * (ref_fq_act(act, None) @ ref_fq(w2[e]).T)[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- whole tiny models

def ckpt_tensors(ckpt: Path, suffix: str) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith(suffix)}


def check_scores(engine: Path, reference, greedy=None, tol: float = 1e-4) -> None:
    """kiln's logits equal the fake-quantized reference's; greedy tokens are identical."""
    with kiln.LLM(engine, device="cpu") as llm:
        for prompt in PROMPTS:
            got, want = llm.score(prompt).double(), reference(prompt).double()
            assert got.shape == want.shape
            assert (got - want).abs().max() <= tol * want.abs().max(), (got - want).abs().max()
        tokens = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY)]
    if greedy is not None:
        assert tokens == [greedy(p) for p in PROMPTS]


def fake_quant_linears(model: torch.nn.Module, names: dict[str, str], per_channel: bool,
                       static: dict[str, float] | None) -> None:
    """Each quantized nn.Linear (HF name -> kiln layer name) gets its fake-quantized weight and a pre-hook that
    fake-quantizes its input (per token, or with the static scale of its kiln name)."""
    modules = dict(model.named_modules())
    for hf, ours in names.items():
        lin = modules[hf]
        with torch.no_grad():
            lin.weight.copy_(ref_fq(lin.weight, -1 if per_channel else None))
        scale = None if static is None else static[ours]
        lin.register_forward_pre_hook(lambda _m, args, s=scale: (ref_fq_act(args[0], s), *args[1:]))


def input_amax(model: torch.nn.Module, hf_names: list[str], model_dir: Path, calib: Path) -> dict[str, float]:
    """The float model's per-tensor amax of each named module's input over the calibration windows."""
    windows = calibration_windows(load_tokenizer(str(model_dir)),
                                  KVCalibration(dataset=str(calib), num_samples=4, max_seq_len=32), 256)
    amax = dict.fromkeys(hf_names, 0.0)
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(
        lambda _m, args, n=n: amax.__setitem__(n, max(amax[n], args[0].abs().max().item()))) for n in hf_names]
    with torch.no_grad():
        for window in windows:
            model(torch.tensor([window]))
    for h in hooks:
        h.remove()
    return amax


def mpt_names(layers: int) -> dict[str, str]:
    parts = {"attn.Wqkv": "attn.qkv_proj", "attn.out_proj": "attn.o_proj", "ffn.up_proj": "ffn.up_proj",
             "ffn.down_proj": "ffn.down_proj"}
    return {f"transformer.blocks.{i}.{hf}": f"layers.{i}.{k}" for i in range(layers) for hf, k in parts.items()}


@pytest.mark.parametrize("flags", [STATIC, DYNAMIC], ids=["static", "per_token"])
def test_mpt_matches_fake_quantized_reference(flags, tmp_path):
    model_dir = tiny_hf_dir(tmp_path, "mpt")
    calib = calib_text(tmp_path)
    engine = convert_build(tmp_path, model_dir, *flags, "--calib_dataset", str(calib), *CALIB)
    config = json.loads((engine / "config.json").read_text())
    static = flags == STATIC
    assert config["quantization"]["quant_algo"] == ("FP8" if static else "FP8_PER_CHANNEL_PER_TOKEN")
    cfg = mpt_published_config(vocab_size=512)
    model = hf_mpt_model(cfg)
    names = mpt_names(cfg["n_layers"])
    scales = None
    if static:  # the calibrated scales are the float model's input amax / 448, computed here independently
        amax = input_amax(model, list(names), model_dir, calib)
        scales = {names[n]: a / 448 for n, a in amax.items()}
        stored = {k.removesuffix(".input_scale"): v.item() for k, v in ckpt_tensors(tmp_path / "ckpt",
                                                                                      ".input_scale").items()}
        assert stored.keys() == scales.keys()
        for k, v in scales.items():
            assert math.isclose(stored[k], v, rel_tol=1e-6), k
    fake_quant_linears(model, names, per_channel=not static, static=scales)
    check_scores(engine, *hf_scorers(model))


def test_fused_gate_up_shares_the_max_of_its_parts_scales(tmp_path):
    model_dir = tiny_hf_dir(tmp_path, "dbrx")
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "ckpt"), "--dtype",
                      "float32", *STATIC, "--calib_dataset", str(calib_text(tmp_path)), *CALIB]) == 0
    cfg = dbrx_published_config(vocab_size=512)
    mlp = hf_dbrx_model(cfg).transformer.blocks[0].ffn.experts.mlp
    experts, ffn = cfg["ffn_config"]["moe_num_experts"], cfg["ffn_config"]["ffn_hidden_size"]
    w1, v1 = (p.detach().view(experts, ffn, -1) for p in (mlp.w1, mlp.v1))  # HF: gate and up apart
    w13 = ckpt_tensors(tmp_path / "ckpt", "layers.0.ffn.w13")["layers.0.ffn.w13"]
    scale = ckpt_tensors(tmp_path / "ckpt", "layers.0.ffn.w13_scale")["layers.0.ffn.w13_scale"]
    for e in range(experts):
        shared = max(w1[e].abs().max().item(), v1[e].abs().max().item()) / 448  # the max of the parts' scales
        assert math.isclose(scale[e].item(), shared, rel_tol=1e-6)
        want = torch.cat([ref_fq_shared(w1[e], scale[e]), ref_fq_shared(v1[e], scale[e])])  # both requantized
        assert torch.equal(w13[e].float() * scale[e], want)


def ref_fq_shared(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-448, 448).to(E4M3).float() * scale


class FakeQuantBaichuan(BaichuanReference):
    """The Baichuan reference with per-channel fake-quantized weights and per-token fake-quantized GEMM inputs."""

    def _attention(self, x: torch.Tensor, p: str, mask: torch.Tensor) -> torch.Tensor:
        inner = BaichuanReference._attention
        o_name = p + "self_attn.o_proj.weight"
        w_o = self.w[o_name]
        self.w[o_name] = torch.eye(self.hidden, dtype=w_o.dtype)  # run the attention without o_proj, then apply it quantized
        try:
            out = inner(self, ref_fq_act(x, None), p, mask)
        finally:
            self.w[o_name] = w_o
        return ref_fq_act(out, None) @ w_o.T

    def _mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        xq = ref_fq_act(x, None)
        gate = xq @ self.w[p + "mlp.gate_proj.weight"].T
        up = xq @ self.w[p + "mlp.up_proj.weight"].T
        return ref_fq_act(F.silu(gate) * up, None) @ self.w[p + "mlp.down_proj.weight"].T


def test_baichuan_per_channel_per_token_matches_reference(tmp_path):
    hf_dir, state, cfg = make_baichuan_checkpoint(tmp_path, "v2_13b")
    engine = convert_build(tmp_path, hf_dir, "--model_version", "v2_13b", *DYNAMIC)
    keep = ("embed", "lm_head", "norm")
    deq = {n: ref_fq(w, -1) if w.dim() == 2 and not any(k in n for k in keep) else w for n, w in state.items()}
    ref = FakeQuantBaichuan(deq, cfg, "v2_13b")
    check_scores(engine, ref.logits, lambda p: ref.greedy(p, 6))


def patch_dbrx_experts(model: torch.nn.Module, cfg: dict, per_channel: bool, static: dict[str, float] | None) \
        -> None:
    """transformers' DBRX with fake-quantized weights (per expert or per channel) and activations: the attention's
    nn.Linear layers hooked, each expert's GLU fake-quantizing its input (static or per token) and intermediate."""
    layers = cfg["n_layers"]
    attn = {f"transformer.blocks.{i}.norm_attn_norm.attn.{hf}": f"layers.{i}.attn.{k}"
            for i in range(layers) for hf, k in (("Wqkv", "qkv_proj"), ("out_proj", "o_proj"))}
    fake_quant_linears(model, attn, per_channel, static)
    experts, ffn = cfg["ffn_config"]["moe_num_experts"], cfg["ffn_config"]["ffn_hidden_size"]
    for i in range(layers):
        mlp = model.transformer.blocks[i].ffn.experts.mlp
        with torch.no_grad():
            w1, v1, w2 = (p.view(experts, ffn, -1) for p in (mlp.w1, mlp.v1, mlp.w2))
            for e in range(experts):
                if per_channel:
                    w1[e], v1[e] = ref_fq(w1[e], -1), ref_fq(v1[e], -1)
                    w2[e] = ref_fq(w2[e], 0)  # w2_e [ffn, hidden] is used as inter @ w2_e: a column per output
                else:
                    both = ref_fq(torch.cat([w1[e], v1[e]]))  # gate and up: one tensor, one scale
                    w1[e], v1[e] = both[:ffn], both[ffn:]
                    w2[e] = ref_fq(w2[e])
        scale = None if static is None else static[f"layers.{i}.ffn.w13"]

        def forward(x, ew1, ev1, ew2, s=scale, act=mlp.activation_fn):
            xq = ref_fq_act(x, s)
            inter = act(xq @ ew1.T) * (xq @ ev1.T)
            return ref_fq_act(inter, None) @ ew2
        mlp.forward = forward


@pytest.mark.parametrize("flags", [STATIC, DYNAMIC], ids=["static", "per_token"])
def test_dbrx_experts_match_fake_quantized_reference(flags, tmp_path):
    model_dir = tiny_hf_dir(tmp_path, "dbrx")
    calib = calib_text(tmp_path)
    engine = convert_build(tmp_path, model_dir, *flags, "--calib_dataset", str(calib), *CALIB)
    cfg = dbrx_published_config(vocab_size=512)
    model = hf_dbrx_model(cfg)
    static = None
    if flags == STATIC:
        stored = ckpt_tensors(tmp_path / "ckpt", "input_scale")
        hf_inputs = [f"transformer.blocks.{i}.{m}" for i in range(cfg["n_layers"])
                     for m in ("norm_attn_norm.attn.Wqkv", "norm_attn_norm.attn.out_proj", "ffn.experts")]
        amax = input_amax(model, hf_inputs, model_dir, calib)
        static = {}
        for name, a in amax.items():
            i = name.split(".")[2]
            ours = {"Wqkv": f"layers.{i}.attn.qkv_proj", "out_proj": f"layers.{i}.attn.o_proj",
                    "experts": f"layers.{i}.ffn.w13"}[name.rsplit(".", 1)[1]]
            static[ours] = a / 448
            key = ours + ("_input_scale" if ours.endswith("w13") else ".input_scale")
            assert math.isclose(stored[key].item(), a / 448, rel_tol=1e-6), key
    patch_dbrx_experts(model, cfg, per_channel=flags == DYNAMIC, static=static)
    check_scores(engine, *hf_scorers(model))


# ------------------------------------------------------------------------- published FP8 checkpoints (vLLM's format)

def publish_fp8(state: dict[str, torch.Tensor], quantized: list[str], input_scales: dict[str, float] | None,
                scale_shape: tuple[int, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors of a published per-tensor FP8 checkpoint, written from the format's description: each quantized
    `X.weight` as float8_e4m3fn with `X.weight_scale` (float32, amax / 448) and, static, `X.input_scale`. Returns
    the published tensors and the dequantized weights (q * scale, float32)."""
    out, deq = dict(state), {}
    for name in quantized:
        w = state[name].float()
        scale = w.abs().max() / 448
        q = (w / scale).clamp(-448, 448).to(E4M3)
        base = name.removesuffix(".weight")
        out[name], out[base + ".weight_scale"] = q, scale.reshape(scale_shape).float()
        if input_scales is not None:
            out[base + ".input_scale"] = torch.tensor(input_scales[base], dtype=torch.float32)
        deq[name] = q.float() * scale
    return out, deq


def test_published_static_fp8_mpt_gives_its_dequantized_logits(tmp_path):
    cfg = mpt_published_config()
    model = hf_mpt_model(cfg)
    state = published_state(model)
    names = mpt_names(cfg["n_layers"])
    gen = torch.Generator().manual_seed(3)
    inputs = {hf: 0.002 + 0.01 * torch.rand(1, generator=gen).item() for hf in names}  # some clip, some do not
    published, deq = publish_fp8(state, [hf + ".weight" for hf in names], inputs)
    cfg_q = dict(cfg, quantization_config={"quant_method": "fp8", "activation_scheme": "static"})
    engine = convert_build(tmp_path, save_checkpoint(published, cfg_q, tmp_path / "hf"))  # no quantization flags
    config = json.loads((engine / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8"
    assert config["provenance"]["fp8_calibration"]["published_scales"] is True
    weights = ckpt_tensors(tmp_path / "ckpt", "qkv_proj.weight")
    assert torch.equal(weights["layers.0.attn.qkv_proj.weight"].float(),
                       published["transformer.blocks.0.attn.Wqkv.weight"].float())  # the same fp8 values
    with torch.no_grad():
        for name, w in deq.items():
            model.get_parameter(name).copy_(w)
    modules = dict(model.named_modules())
    for hf in names:
        modules[hf].register_forward_pre_hook(lambda _m, args, s=inputs[hf]: (ref_fq_act(args[0], s), *args[1:]))
    check_scores(engine, *hf_scorers(model))


def test_published_dynamic_fp8_baichuan_requantizes_gate_up_to_the_max_scale(tmp_path):
    hf_dir, state, cfg = make_baichuan_checkpoint(tmp_path, "v2_13b")
    quantized = [n for n, w in state.items() if w.dim() == 2 and not any(k in n for k in ("embed", "lm_head"))]
    published, deq = publish_fp8(state, quantized, None, scale_shape=(1,))
    cfg_q = dict(cfg, quantization_config={
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                  "symmetric": True, "dynamic": False},
                                      "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                            "symmetric": True, "dynamic": True}}}})
    from fixtures_baichuan import save_published
    out = save_published(published, cfg_q, tmp_path / "hf_fp8", "safetensors", 2)
    engine = convert_build(tmp_path, out, "--model_version", "v2_13b")
    assert json.loads((engine / "config.json").read_text())["quantization"]["quant_algo"] == \
        "FP8_PER_TENSOR_PER_TOKEN"
    ref_state = {**state, **deq}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp."
        shared = torch.maximum(published[p + "gate_proj.weight_scale"], published[p + "up_proj.weight_scale"])
        for part in ("gate_proj.weight", "up_proj.weight"):  # the smaller-scale part is requantized to the max
            ref_state[p + part] = ref_fq_shared(deq[p + part], shared)
    ref = FakeQuantBaichuan(ref_state, cfg, "v2_13b")
    check_scores(engine, ref.logits, lambda p: ref.greedy(p, 6))


# ------------------------------------------------------------------------------------ tensor parallel, flags, errors

def scores_and_tokens(engine: Path) -> tuple[list[torch.Tensor], list[list[int]]]:
    with kiln.LLM(engine, device="cpu") as llm:
        return [llm.score(p) for p in PROMPTS], [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("family, flags, extra", [
    ("dbrx", STATIC, ("--moe_tp_mode", "1")),  # expert parallel: whole experts and their scales per rank
    ("dbrx", DYNAMIC, ("--moe_tp_mode", "1")),  # per-token scales of row-parallel inputs: max over the ranks
    ("mpt", STATIC, ()),  # per-tensor and input scales whole on every rank
    ("mpt", DYNAMIC, ()),  # per-channel scales split with their rows
    ("dbrx", STATIC, ()),  # experts tensor parallel: w13 rows split, per-expert scales whole; see below
])
def test_tp2_equals_tp1(family, flags, extra, tmp_path):
    model_dir = tiny_hf_dir(tmp_path, family)
    calib = ("--calib_dataset", str(calib_text(tmp_path)), *CALIB)
    one = scores_and_tokens(convert_build(tmp_path / "tp1", model_dir, *flags, *calib))
    two = scores_and_tokens(convert_build(tmp_path / "tp2", model_dir, *flags, *calib, "--tp_size", "2", *extra))
    if family == "dbrx" and not extra:
        # With the experts' ffn split, each rank quantizes its slice of the GLU intermediate per token on its own
        # (as vLLM does): equal to tp 1 within FP8's noise, not to the last bit.
        for a, b in zip(two[0], one[0]):
            assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
        return
    assert two[1] == one[1]
    for a, b in zip(two[0], one[0]):
        assert (a - b).abs().max().item() < 1e-4


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_per_channel_without_per_token_is_one_line(tmp_path, capsys):
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--output_dir", str(tmp_path / "c"), "--enable_fp8",
                      "--per_channel"]) == 2
    assert "--per_channel --per_token" in one_error_line(capsys)
    assert not (tmp_path / "c").exists()


def test_quantize_fp8_with_dummy_free_preset_writes_fp8(tmp_path):
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--output_dir", str(tmp_path / "c"), "--enable_fp8"]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8"
    assert config["provenance"]["fp8_calibration"]["dummy_amax"] == 8.0
    weights = ckpt_tensors(tmp_path / "c", "qkv_proj.weight")
    assert all(w.dtype == E4M3 for w in weights.values())


def test_bench_times_fp8_beside_the_unquantized_engine(tmp_path):
    out = tmp_path / "p.json"
    assert kiln_main(["bench", "--preset", "mpt-tiny", "--num_layers", "1", "--dtype", "float32", "--device", "cpu",
                      "--weight_only_precision", "none", "fp8", "fp8_pc_pt", "--batch_size", "1", "--input_len", "6",
                      "--output_len", "3", "--warmup", "0", "--output_json", str(out)]) == 0
    runs = json.loads(out.read_text())["precisions"]
    assert list(runs) == ["none", "fp8", "fp8_pc_pt"]
    floor = {p: r["cases"][0]["active_weight_bytes"] for p, r in runs.items()}
    assert floor["fp8"] < floor["none"] and floor["fp8_pc_pt"] < floor["none"]  # one byte a weight (fp32: four)


def test_quantize_qformat_fp8_pc_pt_and_one_step_build(tmp_path):
    model_dir = tiny_hf_dir(tmp_path, "mpt")
    assert kiln_main(["quantize", "--model_dir", str(model_dir), "--qformat", "fp8_pc_pt", "--output_dir",
                      str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["quant_algo"] == \
        "FP8_PER_CHANNEL_PER_TOKEN"
    assert kiln_main(["build", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "e"), "--enable_fp8",
                      "--per_token", "--max_input_len", "16", "--max_seq_len", "32"]) == 0
    assert json.loads((tmp_path / "e" / "config.json").read_text())["quantization"]["quant_algo"] == \
        "FP8_PER_TENSOR_PER_TOKEN"


def test_published_fp8_weight_without_its_scale_is_one_line(tmp_path, capsys):
    cfg = mpt_published_config()
    state = published_state(hf_mpt_model(cfg))
    published, _ = publish_fp8(state, ["transformer.blocks.0.ffn.up_proj.weight"], None)
    del published["transformer.blocks.0.ffn.up_proj.weight_scale"]
    cfg_q = dict(cfg, quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"})
    hf = save_checkpoint(published, cfg_q, tmp_path / "hf")
    assert kiln_main(["convert", "--model_dir", str(hf), "--output_dir", str(tmp_path / "c")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after convert's progress bar)
    assert last.startswith("kiln convert: error: ") and "has no transformer.blocks.0.ffn.up_proj.weight_scale" in last
    assert not (tmp_path / "c").exists()


def test_heldout_perplexity_of_fp8_on_mpt_books(tmp_path):
    """FP8 (static scales calibrated on the shipped text) within +2% of float32 on a held-out slice (the 20,000-token
    table is in docs/quantization.md)."""
    from test_quant_weight_only import slice_perplexity

    fp32 = slice_perplexity(tmp_path / "fp32", "mpt-books")
    fp8 = slice_perplexity(tmp_path / "fp8", "mpt-books", "--enable_fp8", "--calib_size", "8")
    assert fp32 < 200  # a trained model, not noise
    assert abs(fp8 / fp32 - 1) <= 0.02, (fp32, fp8)


@pytest.mark.parametrize("algo", sorted(FP8_SCHEMES))
def test_scaled_mm_call_matches_the_reference_where_torch_runs_it_on_the_cpu(algo):
    """The _scaled_mm path's layouts and scale shapes (row-major A, column-major B, scalar or row-wise scales), run
    through torch's CPU _scaled_mm (torch >= 2.10 has one; the GPU test repeats this on FP8 tensor cores)."""
    scheme = FP8_SCHEMES[algo]
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(5, 32, generator=gen), torch.randn(48, 32, generator=gen) * 0.1, torch.randn(48)
    q, scale = scheme.quantize(w, torch.float32)
    static = None if scheme.dynamic else torch.tensor([x.abs().max().item() / 448])
    try:
        got = FP8Matmul(scheme, scale, static, use_scaled_mm=True)(x.bfloat16(), q, b.bfloat16())
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"this torch has no CPU _scaled_mm for it: {err}")
    want = FP8Matmul(scheme, scale, static, use_scaled_mm=False)(x.bfloat16().float(), q, b.bfloat16().float())
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()


def test_static_fp8_asked_of_a_dynamic_published_checkpoint_is_calibrated(tmp_path):
    model_dir = tiny_hf_dir(tmp_path, "mpt")
    cfg = json.loads((model_dir / "config.json").read_text())
    state = published_state(hf_mpt_model(mpt_published_config(vocab_size=512)))
    published, _ = publish_fp8(state, [hf + ".weight" for hf in mpt_names(cfg["n_layers"])], None)
    out = save_checkpoint(published, dict(cfg, quantization_config={"quant_method": "fp8",
                                                                      "activation_scheme": "dynamic"}), model_dir)
    engine = convert_build(tmp_path, out, *STATIC, "--calib_dataset", str(calib_text(tmp_path)), *CALIB)
    config = json.loads((engine / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8"
    assert config["provenance"]["fp8_calibration"]["samples"] == 4  # calibrated, not read from the checkpoint


def test_scales_are_divided_not_multiplied_by_a_reciprocal():
    # amax / 448 as one IEEE division on every device (kiln/quant/exact_div.py): torch on CUDA multiplies by the
    # reciprocal of a Python-number divisor, which differs in the last bit for some amaxes and then disagrees with
    # the Triton kernels' div_rn. Here: values where the two roundings differ, checked against float64 division.
    from kiln.quant.exact_div import divided
    from kiln.quant.fp8 import activation_scale

    amax = torch.linspace(0.5, 600.0, 20001, dtype=torch.float32)
    by_reciprocal = amax * torch.tensor(1 / 448.0, dtype=torch.float32)
    exact = (amax.double() / 448.0).float()
    assert (by_reciprocal != exact).any()  # the hazard is real for float32
    assert torch.equal(divided(amax, 448.0), exact)
    assert torch.equal(activation_scale(amax.reshape(-1, 1), None).reshape(-1), exact.clamp(min=1e-12))
