"""--quantize_lm_head with the weight-only formats: whole tiny models of every family (per-channel INT8/INT4 and
group-wise INT4 round to nearest, AWQ, GPTQ) against references whose LM head the test quantizes or dequantizes with
its own code; MPT's tied head quantized while its embedding keeps float rows, Baichuan2's NormHead quantized on its
normalised rows; tp 2 (the vocabulary split over ranks) against tp 1; the checkpoint's record, the memory plan, the
command line and its refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fixtures_baichuan import BaichuanReference, make_baichuan_checkpoint
from fixtures_dbrx import hf_scorers, make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, reference_greedy, reference_logits, \
    save_checkpoint
from test_quant_group_wise import build, dequantized_checkpoint, ref_fake_quant, ref_params, scores_and_tokens
from test_quant_weight_only import PRECISIONS, check_scores, convert_build, fake_quant_dbrx, fake_quant_state, \
    one_error_line, ref_quant, slice_perplexity, wo_flags
from kiln.bench.physics import weight_bytes
from kiln.checkpoint.convert import convert
from kiln.checkpoint.kiln_format import load_artifact
from kiln.cli.convert_cmd import plan_from_hf
from kiln.cli.main import main as kiln_main
from kiln.config import QuantConfig
from kiln.quant.calibrate import CalibrationOptions

HEAD = ("--quantize_lm_head",)


def mpt_checkpoint(tmp: Path) -> tuple[Path, dict, dict]:
    cfg = mpt_published_config()
    state = published_state(hf_mpt_model(cfg))
    return save_checkpoint(state, cfg, tmp / "hf"), state, cfg


def untied(state: dict[str, torch.Tensor], cfg: dict, head: torch.Tensor) -> tuple[dict, dict]:
    """MPT's reference with its own head tensor: the embedding keeps its rows, the head is `head`."""
    return {**state, "lm_head.weight": head}, {**cfg, "tie_word_embeddings": False}


# ---------------------------------------------------------------------------------------- per channel INT8 / INT4

@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_mpt_tied_head_is_quantized_and_the_embedding_stays_float(precision, tmp_path):
    hf_dir, state, cfg = mpt_checkpoint(tmp_path)
    engine = convert_build(tmp_path, hf_dir, *wo_flags(precision), *HEAD)
    quant = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization"]
    assert quant["quantize_lm_head"] is True
    tensors = load_file(str(tmp_path / "ckpt" / "rank0.safetensors"))
    wte = state["transformer.wte.weight"]
    assert tensors["lm_head.weight"].dtype == torch.int8 and tensors["lm_head.weight_scale"].shape == (wte.shape[0],)
    assert torch.equal(tensors["embed_tokens.weight"], wte)  # the lookup reads float rows
    bits = PRECISIONS[precision]
    deq, ref_cfg = untied(fake_quant_state(state, bits), cfg, ref_quant(wte, bits).float())
    check_scores(engine, lambda p: reference_logits(deq, ref_cfg, p), lambda p: reference_greedy(deq, ref_cfg, p, 6))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_baichuan2_norm_head_is_quantized_on_its_normalised_rows(precision, tmp_path):
    hf_dir, state, cfg = make_baichuan_checkpoint(tmp_path, "v2_13b")
    engine = convert_build(tmp_path, hf_dir, "--model_version", "v2_13b", *wo_flags(precision), *HEAD)
    bits = PRECISIONS[precision]
    deq = fake_quant_state(state, bits)
    deq["lm_head.weight"] = ref_quant(F.normalize(state["lm_head.weight"].float(), dim=1), bits).float()
    ref = BaichuanReference(deq, cfg, "v2_13b")
    ref.norm_head = False  # the head above is already the quantized normalised rows
    check_scores(engine, ref.logits, lambda p: ref.greedy(p, 6))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_dbrx_untied_head_is_quantized(precision, tmp_path):
    hf_dir, model, cfg = make_dbrx_checkpoint(tmp_path)
    engine = convert_build(tmp_path, hf_dir, *wo_flags(precision), *HEAD)
    bits = PRECISIONS[precision]
    fake_quant_dbrx(model, cfg, bits)
    with torch.no_grad():
        model.lm_head.weight.copy_(ref_quant(model.lm_head.weight, bits))
    check_scores(engine, *hf_scorers(model))


@pytest.mark.parametrize("family, precision, split", [("mpt", "int4", "--tp_size"), ("dbrx", "int8", "--tp_size"),
                                                      ("mpt", "int8", "--pp_size")])
def test_tp2_or_pp2_equals_one_rank(family, precision, split, tmp_path):
    hf_dir = mpt_checkpoint(tmp_path)[0] if family == "mpt" else make_dbrx_checkpoint(tmp_path)[0]
    one = scores_and_tokens(convert_build(tmp_path / "one", hf_dir, *wo_flags(precision), *HEAD))
    two_engine = convert_build(tmp_path / "two", hf_dir, *wo_flags(precision), *HEAD, split, "2")
    rank1 = load_file(str(two_engine / "rank1.safetensors"))  # tp: half the vocabulary; pp: the last stage's head
    rows = 150 if split == "--tp_size" else 300
    assert rank1["lm_head.weight"].dtype == torch.int8 and rank1["lm_head.weight_scale"].shape == (rows,)
    two = scores_and_tokens(two_engine)
    assert two[1] == one[1]
    for a, b in zip(two[0], one[0]):
        assert (a - b).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------- group-wise INT4

def group_wise_plan(tmp: Path, hf_dir: Path, algo: str, version: str | None = None, tp: int = 1,
                    calibrated: bool = True):
    quant = QuantConfig(quant_algo=f"W4A16_{algo.upper()}", group_size=32, has_zero_point=True,
                        exclude_modules=["embed_tokens", "*router", "*norm*"], quantize_lm_head=True)
    plan = plan_from_hf(str(hf_dir), "float32", tp, 1, version, quant)
    options = CalibrationOptions(algo, sequences=4, length=24, sample_tokens=64, grid=4) if calibrated else None
    # No tokenizer in these fixtures: seeded random tokens (what dummy weights calibrate on).
    return dataclasses.replace(plan, calibration=options, provenance={**plan.provenance, "model_dir": None})


def stored_head(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [vocab, hidden] unpacked by the test, scale, zero) of a tp 1 checkpoint's group-wise head."""
    t = load_file(str(ckpt / "rank0.safetensors"))
    packed = t["lm_head.weight"].view(torch.uint8)
    q = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).float()
    return q, t["lm_head.weight_scale"], t["lm_head.weight_zero"]


def check_against_dequantized(tmp: Path) -> None:
    """The engine of tmp/ckpt gives the tokens and logits of a float engine of its weights as the test dequantizes
    them (the head's included)."""
    dequantized_checkpoint(tmp / "ckpt", tmp / "float")
    quantized, reference = scores_and_tokens(build(tmp)), scores_and_tokens(build(tmp, "float", "e2"))
    assert quantized[1] == reference[1]
    for a, b in zip(quantized[0], reference[0]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_mpt_awq_rounds_the_tied_head_to_nearest(tmp_path):
    hf_dir, state, _ = mpt_checkpoint(tmp_path)
    convert(group_wise_plan(tmp_path, hf_dir, "awq"), tmp_path / "ckpt", progress=False)
    wte = state["transformer.wte.weight"]
    q, scale, zero = stored_head(tmp_path / "ckpt")
    want_q, want_scale, want_zero = ref_params(wte, 32)  # AWQ leaves the head to round to nearest
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale) and torch.equal(zero, want_zero)
    assert torch.equal(load_file(str(tmp_path / "ckpt" / "rank0.safetensors"))["embed_tokens.weight"], wte)
    check_against_dequantized(tmp_path)


def test_baichuan2_gptq_calibrates_the_normalised_head(tmp_path):
    hf_dir, state, cfg = make_baichuan_checkpoint(tmp_path, "v2_13b")
    plan = group_wise_plan(tmp_path, hf_dir, "gptq", "v2_13b")
    convert(plan, tmp_path / "ckpt", progress=False)
    normalised = F.normalize(state["lm_head.weight"].float(), dim=1).double()
    q, scale, zero = stored_head(tmp_path / "ckpt")
    idx = torch.arange(q.shape[1]) // 32
    deq = ((q - zero[:, idx]) * scale[:, idx]).double()
    rtn = ref_fake_quant(normalised, 32).double()
    # The head's inputs on the calibration windows (seeded random ids: no tokenizer), from the float model: the
    # reference's logits through an identity head are the final norm's outputs.
    ref = BaichuanReference(state, cfg, "v2_13b")
    ref.norm_head, ref.w["lm_head.weight"] = False, torch.eye(cfg["hidden_size"], dtype=torch.float64)
    windows = torch.Generator().manual_seed(plan.calibration.seed)
    tokens = torch.randint(0, cfg["vocab_size"], (4, 24), generator=windows)
    x = torch.cat([ref.logits(row.tolist()) for row in tokens])  # [96, hidden]
    error = {name: (x @ (w - normalised).T).norm().item() for name, w in (("gptq", deq), ("rtn", rtn))}
    assert error["gptq"] < 0.9 * error["rtn"], error  # GPTQ lowered the head's output error on its inputs
    check_against_dequantized(tmp_path)


def test_dbrx_group_wise_head_matches_the_fake_quantized_model_at_tp1_and_tp2(tmp_path):
    hf_dir, model, cfg = make_dbrx_checkpoint(tmp_path)
    for tp in (1, 2):
        convert(group_wise_plan(tmp_path, hf_dir, "gptq", tp=tp, calibrated=False), tmp_path / f"ckpt{tp}",
                progress=False)
        build(tmp_path, f"ckpt{tp}", f"engine{tp}")
    experts, ffn = cfg["ffn_config"]["moe_num_experts"], cfg["ffn_config"]["ffn_hidden_size"]
    with torch.no_grad():  # every quantized weight, the head included, through the test's own quantizer
        for name, p in model.named_parameters():
            if name.endswith(("Wqkv.weight", "out_proj.weight", "mlp.w1", "mlp.v1", "lm_head.weight")):
                p.copy_(ref_fake_quant(p, 32))
            elif name.endswith("mlp.w2"):
                p.copy_(ref_fake_quant(p.view(experts, ffn, -1), 32, dim=1).reshape(p.shape))
    for tp in (1, 2):
        check_scores(tmp_path / f"engine{tp}", *hf_scorers(model))


# ------------------------------------------------------------------------------------ record, memory, command line

def test_quantize_records_the_head_and_build_plans_its_smaller_bytes(tmp_path, capsys):
    hf_dir = mpt_checkpoint(tmp_path)[0]
    plans = {}
    for name, flags in (("float_head", ()), ("int4_head", HEAD)):
        ckpt = tmp_path / name
        assert kiln_main(["quantize", "--model_dir", str(hf_dir), "--qformat", "int4_wo", "--dtype", "bfloat16",
                          "--output_dir", str(ckpt), *flags]) == 0
        assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / f"e_{name}"),
                          "--max_seq_len", "64", "--max_input_len", "32"]) == 0
        plans[name] = json.loads((tmp_path / f"e_{name}" / "config.json").read_text())["memory_plan"]
    quant = json.loads((tmp_path / "int4_head" / "config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["quantize_lm_head"]) == ("W4A16", True)
    vocab, hidden = 300, 48
    saved = vocab * hidden * 2 - (vocab * hidden // 2 + vocab * 2)  # bf16 rows -> 4-bit values and a bf16 scale
    assert plans["float_head"]["weight_bytes"] - plans["int4_head"]["weight_bytes"] == saved
    assert plans["int4_head"]["quantized_bytes"] - plans["float_head"]["quantized_bytes"] == vocab * hidden // 2 + 600
    # kiln bench's physics: the head streams its stored bytes, and its FLOPs count its logical weights
    split = weight_bytes(load_artifact(tmp_path / "e_int4_head", "engine"),
                         SimpleNamespace(weight_bytes=plans["int4_head"]["weight_bytes"]))
    assert (split.head, split.head_params) == (vocab * hidden // 2, vocab * hidden)


def test_one_step_build_quantizes_the_head(tmp_path):
    hf_dir = mpt_checkpoint(tmp_path)[0]
    assert kiln_main(["build", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "engine"), "--dtype",
                      "float32", *wo_flags("int8"), *HEAD, "--max_seq_len", "64", "--max_input_len", "32"]) == 0
    config = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert config["quantization"]["quantize_lm_head"] is True
    assert load_file(str(tmp_path / "engine" / "rank0.safetensors"))["lm_head.weight"].dtype == torch.int8


def test_convert_flags_of_group_wise_drop_lm_head_from_exclude_modules(tmp_path):
    out = tmp_path / "ckpt"
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--output_dir", str(out), "--use_weight_only",
                      "--weight_only_precision", "int4_awq", "--group_size", "32", *HEAD]) == 0
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["quantize_lm_head"] and "lm_head" not in quant["exclude_modules"]
    assert "embed_tokens" in quant["exclude_modules"]
    tensors = load_file(str(out / "rank0.safetensors"))
    assert tensors["lm_head.weight"].dtype == torch.int8 and "lm_head.weight_zero" in tensors


@pytest.mark.parametrize("argv, flags", [
    (["convert", "--preset", "mpt-tiny", *HEAD], "--quantize_lm_head"),
    (["convert", "--preset", "mpt-tiny", "--enable_fp8", *HEAD], "--enable_fp8, --quantize_lm_head"),
    (["convert", "--preset", "mpt-tiny", "--smoothquant", "0.5", *HEAD], "--smoothquant, --quantize_lm_head"),
    (["quantize", "--model_dir", "m", "--qformat", "fp8", *HEAD], "--qformat fp8, --quantize_lm_head"),
    (["quantize", "--model_dir", "m", *HEAD], "--quantize_lm_head"),
])
def test_quantize_lm_head_without_a_weight_only_format_is_refused(argv, flags, tmp_path, monkeypatch, capsys):
    from kiln.cli.quant_flags import MESSAGE

    monkeypatch.chdir(tmp_path)
    assert kiln_main(argv) == 2
    assert one_error_line(capsys) == f"kiln {argv[0]}: error: {flags}: {MESSAGE}"
    assert "--quantize_lm_head goes with the weight-only formats" in MESSAGE
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, message", [
    ({"quant_algo": "FP8"}, "--quantize_lm_head goes with the weight-only formats"),
    ({"exclude_modules": ["lm_head"]}, "exclude_modules keeps lm_head in float"),
    ({"quantize_lm_head": "yes"}, "quantize_lm_head must be true or false"),
])
def test_a_checkpoint_config_that_contradicts_itself_is_one_line(change, message, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert kiln_main(["convert", "--preset", "mpt-tiny", "--output_dir", str(out), *wo_flags("int8"), *HEAD]) == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization"].update(change)
    (out / "config.json").chmod(0o644)
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert kiln_main(["build", "--checkpoint_dir", str(out), "--output_dir", str(tmp_path / "e")]) == 2
    assert message in one_error_line(capsys)


# ----------------------------------------------------------------------------------- accuracy on a trained model

def test_heldout_perplexity_with_the_head_quantized_on_mpt_books(tmp_path):
    # Measured on this slice (1000 tokens): fp32 53.305, INT8 with the head 53.324, INT4 53.608, INT4 with the head
    # 54.677; the 20,000-token table is in docs/quantization.md ("The LM head").
    fp32 = slice_perplexity(tmp_path / "fp32", "mpt-books")
    int8 = slice_perplexity(tmp_path / "int8", "mpt-books", *wo_flags("int8"), *HEAD)
    int4 = slice_perplexity(tmp_path / "int4", "mpt-books", *wo_flags("int4"))
    int4_head = slice_perplexity(tmp_path / "int4_head", "mpt-books", *wo_flags("int4"), *HEAD)
    assert abs(int8 / fp32 - 1) <= 0.005, (fp32, int8)  # an INT8 head costs nothing measurable
    assert int4 < int4_head <= 1.04 * fp32, (fp32, int4, int4_head)  # a 4-bit head does cost (it is quantized)
