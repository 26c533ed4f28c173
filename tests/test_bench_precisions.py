"""`kiln bench --weight_only_precision`: dummy engines of several weight-only formats timed in one run beside the
unquantized one (CPU, tiny), their floors counting quantized bytes, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.bench import BenchOptions
from kiln.bench.dummy import dummy_model_config
from kiln.bench.precisions import precision_quant
from kiln.cli.main import main as kiln_main


def test_precisions_side_by_side(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert kiln_main(["bench", "--preset", "mpt-tiny", "--num_layers", "1", "--dtype", "float32", "--device", "cpu",
                      "--weight_only_precision", "none", "int8", "int4", "--batch_size", "1", "--input_len", "6",
                      "--output_len", "3", "--warmup", "0", "--output_json", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = data["precisions"]
    assert list(runs) == ["none", "int8", "int4"]
    floor_bytes = {p: r["cases"][0]["active_weight_bytes"] for p, r in runs.items()}
    # Every dense weight shrinks to a half / a quarter (the embedding and head stay, scales are added): strictly less.
    assert floor_bytes["int4"] < floor_bytes["int8"] < floor_bytes["none"]
    assert runs["int4"]["engine"]["weight_bytes"] < runs["none"]["engine"]["weight_bytes"]
    # Prefill FLOPs count logical weights, so the same work is credited whatever the storage.
    flops = {p: r["cases"][0]["prefill_tflops"] * r["cases"][0]["prefill_ms"] for p, r in runs.items()}
    assert flops["int4"] == pytest.approx(flops["none"], rel=1e-6) and flops["int8"] == pytest.approx(flops["none"],
                                                                                                      rel=1e-6)
    rows = data["comparison"]
    assert [(r["precision"], r["batch_size"]) for r in rows] == [("none", 1), ("int8", 1), ("int4", 1)]
    assert rows[0]["decode_speedup"] == 1.0 and rows[2]["decode_speedup"] > 0
    assert "| precision | batch |" in capsys.readouterr().out


def test_quantized_head_shrinks_the_floor_of_weight_only_precisions_only(tmp_path):
    """--quantize_lm_head: the int4 engine stores its head in 4 bits (fewer bytes than int4 without it), the
    unquantized engine of the same run keeps a float head."""
    runs = {}
    for head in (False, True):
        out = tmp_path / f"h{int(head)}.json"
        assert kiln_main(["bench", "--preset", "mpt-tiny", "--num_layers", "1", "--dtype", "float32", "--device",
                          "cpu", "--weight_only_precision", "none", "int4", "--batch_size", "1", "--input_len", "6",
                          "--output_len", "2", "--warmup", "0", "--output_json", str(out),
                          *(["--quantize_lm_head"] if head else [])]) == 0
        runs[head] = {p: r["engine"]["weight_bytes"] for p, r in json.loads(out.read_text())["precisions"].items()}
    assert runs[True]["none"] == runs[False]["none"]
    assert runs[True]["int4"] < runs[False]["int4"] < runs[False]["none"]
    assert precision_quant("int8", 128, True).quantize_lm_head and not precision_quant("fp8", 128, True).quantize_lm_head


def test_quantized_dummy_plan_carries_the_format():
    plan, _ = dummy_model_config(BenchOptions(preset="mpt-tiny"), precision_quant("int4", 128))
    assert plan.quant.quant_algo == "W4A16"


@pytest.mark.parametrize("argv, message", [
    (["--weight_only_precision", "int3"], "unknown --weight_only_precision 'int3'"),
    (["--weight_only_precision", "int8", "int8"], "lists a precision twice"),
    (["--weight_only_precision", "int8", "--compare_hf"], "--compare_hf times transformers"),
    (["--weight_only_precision", "int4_awq", "--group_size", "48"], "--group_size must be 32, 64 or 128"),
    (["--weight_only_precision", "none", "fp8", "--quantize_lm_head"], "none of them is in --weight_only_precision"),
    (["--quantize_lm_head"], "--quantize_lm_head goes with --weight_only_precision"),
])
def test_bad_precisions_are_one_line(argv, message, capsys):
    assert kiln_main(["bench", "--preset", "mpt-tiny", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_precisions_need_dummy_weights(tmp_path, capsys):
    assert kiln_main(["bench", "--engine_dir", str(tmp_path), "--weight_only_precision", "int8"]) == 2
    assert "converts dummy weights" in capsys.readouterr().err


def _no_rounding_or_calibration(monkeypatch):
    """Dummy weights must be drawn in the format: rounding or calibrating random floats fails the test."""
    from kiln.checkpoint import convert as convert_module
    from kiln.quant.group_wise import GroupWiseMethod
    from kiln.quant.weight_only import WeightOnlyMethod

    def refuse(*args, **kwargs):
        raise AssertionError("dummy weights were rounded or calibrated")

    monkeypatch.setattr(GroupWiseMethod, "quantize", refuse)
    monkeypatch.setattr(WeightOnlyMethod, "quantize", refuse)
    monkeypatch.setattr(convert_module, "calibrate", refuse)


def test_group_wise_precisions_bench_dummy_dbrx_without_calibration(tmp_path, monkeypatch, capsys):
    import time

    _no_rounding_or_calibration(monkeypatch)
    out = tmp_path / "gw.json"
    start = time.perf_counter()
    assert kiln_main(["bench", "--preset", "dbrx-tiny", "--num_layers", "1", "--dtype", "float32", "--device", "cpu",
                      "--weight_only_precision", "none", "int4", "int4_awq", "int4_gptq", "--group_size", "32",
                      "--batch_size", "1", "--input_len", "6", "--output_len", "3", "--warmup", "0",
                      "--output_json", str(out)]) == 0
    assert time.perf_counter() - start < 60
    runs = json.loads(out.read_text())["precisions"]
    assert list(runs) == ["none", "int4", "int4_awq", "int4_gptq"]
    floor = {p: r["cases"][0]["active_weight_bytes"] for p, r in runs.items()}
    # Group-wise INT4 stores a scale and a zero per 32 weights: more bytes than per-channel INT4, far fewer than fp32.
    assert floor["int4"] < floor["int4_awq"] == floor["int4_gptq"] < floor["none"]
    assert all(r["cases"][0]["tokens_per_s"] > 0 for r in runs.values())


@pytest.mark.parametrize("precision, bits_dtype", [("int4_awq", "W4A16_AWQ"), ("int4_gptq", "W4A16_GPTQ"),
                                                    ("int4", "W4A16"), ("int8", "W8A16")])
def test_dummy_convert_draws_weights_in_the_format(precision, bits_dtype, tmp_path, monkeypatch):
    """`kiln convert --preset ... --weight_only_precision P`: the rank file holds the format's tensors (int8 bytes,
    scales, group-wise zeros of the format's shapes and ranges), written without rounding or calibration."""
    from safetensors.torch import load_file

    _no_rounding_or_calibration(monkeypatch)
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--dtype", "bfloat16", "--tp_size", "2",
                      "--use_weight_only", "--weight_only_precision", precision,
                      *(["--group_size", "32"] if precision.endswith(("awq", "gptq")) else []),
                      "--output_dir", str(tmp_path / "ckpt")]) == 0
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == bits_dtype and "calibration" not in config["provenance"]
    hidden, ffn, experts = config["hidden_size"], config["intermediate_size"] // 2, config["moe_num_experts"]
    tensors = load_file(str(tmp_path / "ckpt" / "rank1.safetensors"))
    w2 = next(n for n in tensors if n.endswith(".w2"))
    per_byte = 1 if precision == "int8" else 2
    assert tensors[w2].dtype == torch.int8 and tuple(tensors[w2].shape) == (experts, hidden, ffn // per_byte)
    scale = tensors[w2 + "_scale"]
    assert scale.dtype == torch.bfloat16
    if precision in ("int4_awq", "int4_gptq"):
        k_offset = ffn % 32  # rank 1's ffn slice starts at ffn
        groups = -(-ffn // 32) + (1 if k_offset else 0)
        assert tuple(scale.shape) == (experts, hidden, groups)
        zero = tensors[w2 + "_zero"]
        assert zero.dtype == torch.bfloat16 and zero.shape == scale.shape
        assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 15
        used = scale[..., : (k_offset + ffn - 1) // 32 + 1].float()  # past them: padding never read
        assert (used > 0).all() and (used.median() - 0.02 * 5.4 / 15).abs() < 0.004  # a rounded normal(0, 0.02)'s
    else:
        assert tuple(scale.shape) == (experts, hidden) and (scale > 0).all()


def test_smoothquant_and_fp8_precisions_bench_dummy_dbrx(tmp_path, capsys):
    """The W8A8 precisions are not drawn in their format (kiln.quant.dummy_weights.draws_directly): their dummy float
    weights are rounded at convert (SmoothQuant smoothed on absmax 1 first), with no calibration text, and timed."""
    out = tmp_path / "w8a8.json"
    assert kiln_main(["bench", "--preset", "dbrx-tiny", "--num_layers", "1", "--dtype", "float32", "--device", "cpu",
                      "--weight_only_precision", "none", "int8_sq", "fp8", "--batch_size", "1", "--input_len", "6",
                      "--output_len", "3", "--warmup", "0", "--output_json", str(out)]) == 0
    runs = json.loads(out.read_text())["precisions"]
    assert list(runs) == ["none", "int8_sq", "fp8"]
    floor = {p: r["cases"][0]["active_weight_bytes"] for p, r in runs.items()}
    assert floor["int8_sq"] < floor["none"] and floor["fp8"] < floor["none"]  # one byte a weight, not four
    assert all(r["cases"][0]["tokens_per_s"] > 0 for r in runs.values())


def test_dummy_convert_smoothquant_rounds_smoothed_floats(tmp_path):
    """`kiln convert --preset ... --smoothquant A`: int8 experts with per-channel scales, the smoother and static
    activation scale of each layer, smoothed on unit absmax (no calibration text: dummy weights have no tokenizer)."""
    from safetensors.torch import load_file

    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--dtype", "bfloat16", "--tp_size", "2", "--smoothquant",
                      "0.5", "--per_channel", "--output_dir", str(tmp_path / "ckpt")]) == 0
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    assert config["provenance"]["smoothquant_calibration"] == {"text": None, "unit_absmax": True, "alpha": 0.5}
    hidden, ffn, experts = config["hidden_size"], config["intermediate_size"] // 2, config["moe_num_experts"]
    tensors = load_file(str(tmp_path / "ckpt" / "rank1.safetensors"))
    w2 = next(n for n in tensors if n.endswith(".w2"))
    assert tensors[w2].dtype == torch.int8 and tuple(tensors[w2].shape) == (experts, hidden, ffn)
    assert tensors[w2].abs().max() == 127  # rounded per output channel: each row's largest weight is +-127
    assert tuple(tensors[w2 + "_scale"].shape) == (experts, hidden) and (tensors[w2 + "_scale"] > 0).all()
    assert any(n.endswith("act_scale") for n in tensors) and any(n.endswith("smoother") for n in tensors)
