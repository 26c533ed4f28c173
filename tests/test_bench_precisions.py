"""`kiln bench --weight_only_precision`: dummy engines of several weight-only formats timed in one run beside the
unquantized one (CPU, tiny), their floors counting quantized bytes, and one-line refusals."""

from __future__ import annotations

import json

import pytest

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


def test_quantized_dummy_plan_carries_the_format():
    plan, _ = dummy_model_config(BenchOptions(preset="mpt-tiny"), precision_quant("int4", 128))
    assert plan.quant.quant_algo == "W4A16"


@pytest.mark.parametrize("argv, message", [
    (["--weight_only_precision", "int3"], "unknown --weight_only_precision 'int3'"),
    (["--weight_only_precision", "int8", "int8"], "lists a precision twice"),
    (["--weight_only_precision", "int8", "--compare_hf"], "--compare_hf times transformers"),
    (["--weight_only_precision", "int4_awq", "--group_size", "48"], "--group_size must be 32, 64 or 128"),
])
def test_bad_precisions_are_one_line(argv, message, capsys):
    assert kiln_main(["bench", "--preset", "mpt-tiny", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_precisions_need_dummy_weights(tmp_path, capsys):
    assert kiln_main(["bench", "--engine_dir", str(tmp_path), "--weight_only_precision", "int8"]) == 2
    assert "converts dummy weights" in capsys.readouterr().err
