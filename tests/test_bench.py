"""`kiln bench` on the CPU: every JSON field present and consistent with its definition, transformers on the very
weights kiln runs (its logits equal kiln's in fp32), the floor's parts against the rank file, and one-line errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

import kiln
from kiln.bench import BenchOptions, physics
from kiln.bench.dummy import bench_build_config, dummy_model_config
from kiln.bench.hf import INVERSES, HFUnavailable, hf_config, load_hf_model
from kiln.checkpoint.kiln_format import load_artifact
from kiln.cli.main import main as kiln_main
from kiln.models import PRESETS, family_by_name
from kiln.models.family import find_rule
from kiln.models.transforms import TRANSFORMS

CASE = ["--batch_size", "1", "3", "--input_len", "8", "--output_len", "4", "--warmup", "0"]
CASE_FIELDS = {"batch_size", "input_len", "output_len", "prefill_ms", "prefill_steps", "decode_ms_per_step",
               "decode_steps", "tokens_per_s", "weight_bytes", "active_weight_bytes", "expected_active_experts",
               "kv_bytes_per_step", "floor_ms_per_step", "fraction_of_floor", "hf_prefill_ms", "hf_ms_per_step",
               "hf_tokens_per_s", "kiln_over_hf", "prefill_tflops", "prefill_fraction_of_matmul"}


def make_engine(tmp: Path, preset: str) -> Path:
    assert kiln_main(["convert", "--preset", preset, "--num_layers", "1", "--dtype", "float32", "--seed", "3",
                      "--output_dir", str(tmp / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_batch_size", "4", "--max_input_len", "16", "--max_seq_len", "32"]) == 0
    return tmp / "engine"


@pytest.fixture(scope="module")
def dbrx_engine(tmp_path_factory) -> Path:
    return make_engine(tmp_path_factory.mktemp("bench_dbrx"), "dbrx-tiny")


@pytest.fixture(scope="module")
def dbrx_report(dbrx_engine, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_json") / "bench.json"
    assert kiln_main(["bench", "--engine_dir", str(dbrx_engine), *CASE, "--compare_hf", "--output_json",
                      str(out)]) == 0
    return json.loads(out.read_text())


def file_bytes(engine: Path, select) -> int:
    """Bytes of the rank file's tensors whose names `select` accepts (read from the file, not from kiln's plan)."""
    total = 0
    with safe_open(str(engine / "rank0.safetensors"), framework="pt") as f:
        for name in f.keys():
            if select(name):
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    return total


def test_json_has_every_field_and_consistent_numbers(dbrx_engine, dbrx_report):
    report = dbrx_report
    assert {"device", "versions", "bandwidth_gbs", "matmul_tflops", "engine", "options", "notes", "hf",
            "cases"} <= set(report)
    assert report["bandwidth_gbs"] > 0 and [c["batch_size"] for c in report["cases"]] == [1, 3]
    assert report["matmul_tflops"] > 0
    plan = json.loads((dbrx_engine / "config.json").read_text())["memory_plan"]
    assert report["engine"]["weight_bytes"] == plan["weight_bytes"] == file_bytes(dbrx_engine, lambda n: True)
    experts = file_bytes(dbrx_engine, lambda n: n.endswith((".w13", ".w2")))
    embedding = file_bytes(dbrx_engine, lambda n: n == "embed_tokens.weight")
    assert report["engine"]["expert_bytes"] == experts and report["engine"]["embedding_bytes"] == embedding
    # On the CPU nothing runs as a Triton GEMV or a CUDA graph, and the report says so.
    assert report["engine"]["gemv_layers"] == 0 and report["engine"]["cuda_graphs"] is False
    assert any("E * (1 - (1 - k/E)^B)" in note for note in report["notes"])
    for case in report["cases"]:
        assert set(case) == CASE_FIELDS
        b = case["batch_size"]
        assert case["decode_steps"] == 3 and case["prefill_steps"] == 1 and case["prefill_ms"] > 0
        assert case["tokens_per_s"] == pytest.approx(b * 1000 / case["decode_ms_per_step"], rel=1e-9)
        assert case["weight_bytes"] == plan["weight_bytes"]
        share = 1 - (1 - 2 / 4) ** b  # dbrx-tiny: 4 experts, top 2
        assert case["expected_active_experts"] == pytest.approx(4 * share)
        active = plan["weight_bytes"] - embedding - experts * (1 - share)
        assert case["active_weight_bytes"] == pytest.approx(active)
        kv = b * (8 + 4 / 2) * plan["kv_bytes_per_token"]  # mean context of decode steps: input + output / 2
        assert case["kv_bytes_per_step"] == pytest.approx(kv)
        floor = (active + kv) / (report["bandwidth_gbs"] * 1e9) * 1e3
        assert case["floor_ms_per_step"] == pytest.approx(floor, rel=1e-9)
        assert case["fraction_of_floor"] == pytest.approx(floor / case["decode_ms_per_step"], rel=1e-9)
        assert case["hf_prefill_ms"] > 0 and case["hf_ms_per_step"] > 0  # per-step clock inside generate
        assert case["hf_tokens_per_s"] == pytest.approx(b * 1000 / case["hf_ms_per_step"], rel=1e-9)
        assert case["kiln_over_hf"] == pytest.approx(case["hf_ms_per_step"] / case["decode_ms_per_step"], rel=1e-9)
        head = file_bytes(dbrx_engine, lambda n: n == "lm_head.weight")
        per_token = (plan["weight_bytes"] - embedding - head - experts / 2) / 4  # float32 params; top 2 of 4 experts
        flops = 2 * (per_token * b * 8 + head / 4 * b)  # the head runs once per sequence
        assert case["prefill_tflops"] == pytest.approx(flops / (case["prefill_ms"] * 1e-3) / 1e12, rel=1e-9)
        assert case["prefill_fraction_of_matmul"] == pytest.approx(case["prefill_tflops"] / report["matmul_tflops"])


def test_compare_hf_uses_the_engine_weights(dbrx_report):
    assert dbrx_report["hf"]["available"] and dbrx_report["hf"]["same_weights"]
    assert dbrx_report["hf"]["class"] == "DbrxForCausalLM"


def mpt_engine_from_transformers(tmp: Path) -> tuple[Path, torch.nn.Module]:
    """A tied-head MPT from transformers, saved as the published checkpoints are, converted and built."""
    from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint

    cfg = mpt_published_config(n_layers=1)
    model = hf_mpt_model(cfg, seed=4)
    hf_dir = save_checkpoint(published_state(model), cfg, tmp / "hf_mpt", shards=1)
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_batch_size", "2", "--max_input_len", "16", "--max_seq_len", "32"]) == 0
    return tmp / "engine", model


@pytest.mark.parametrize("family", ["dbrx", "mpt"])
def test_inverted_weights_give_transformers_kilns_logits(family, dbrx_engine, tmp_path):
    original = None
    if family == "dbrx":
        engine = dbrx_engine
    else:
        engine, original = mpt_engine_from_transformers(tmp_path)
    info = load_artifact(engine, "engine")
    hf = load_hf_model(info, torch.device("cpu"))
    assert hf.same_weights, hf.note
    prompt = [5, 17, 33, 2, 99, 150, 7, 201, 12]
    ours = kiln.LLM(engine).score(prompt)
    with torch.no_grad():
        ref = hf.model(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == ref.shape
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"relative logit error {rel:.2e}"
    if original is not None:  # the inverted state is the checkpoint kiln converted, tensor for tensor
        rebuilt = hf.model.state_dict()
        assert all(torch.equal(rebuilt[n], t) for n, t in original.state_dict().items())


def test_tied_head_that_differs_is_reported(tmp_path):
    """Dummy MPT weights tie the head; an engine whose head was changed apart from its embedding cannot be held by
    transformers' tied model, and bench says so."""
    engine = make_engine(tmp_path, "mpt-tiny")
    info = load_artifact(engine, "engine")
    assert load_hf_model(info, torch.device("cpu")).same_weights
    rank_file = info.rank_file(0)
    tensors = load_file(str(rank_file))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    rank_file.unlink()  # a hard link to the checkpoint's file: write a new file, not through the link
    save_file(tensors, str(rank_file))
    hf = load_hf_model(load_artifact(engine, "engine"), torch.device("cpu"))
    assert not hf.same_weights and "transformer.wte.weight" in hf.note


def test_inverses_undo_the_transforms():
    config = dummy_model_config(BenchOptions(preset="dbrx-tiny", dtype="float32"))[1]
    rules = family_by_name("dbrx").weight_rules(config)
    for name, shape in (("layers.0.ffn.w13", (4, 192, 64)), ("layers.0.ffn.w2", (4, 64, 96))):
        rule = find_rule(rules, name)
        t = torch.randn(shape)
        sources = INVERSES[rule.transform](t, config)
        assert all(s.shape == (4 * 96, 64) for s in sources)
        assert torch.equal(TRANSFORMS[rule.transform](sources, config), t)


def test_baichuan_has_no_transformers_column():
    options = BenchOptions(preset="baichuan-tiny")
    config = dummy_model_config(options)[1]
    with pytest.raises(HFUnavailable, match="no BaichuanForCausalLM class"):
        hf_config(config)


def test_dummy_engine_run_cleans_up_and_mpt_compares(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "mpt.json"
    assert kiln_main(["bench", "--preset", "mpt-tiny", "--num-layers", "1", "--dtype", "float32", "--batch-size",
                      "2", "--input_len", "6", "--output_len", "3", "--compare-hf", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["hf"]["available"] and report["cases"][0]["hf_ms_per_step"] > 0
    assert report["cases"][0]["expected_active_experts"] is None  # dense: every weight is active
    assert report["engine"]["build"]["max_num_tokens"] == 12  # the whole batch prefilled in one step
    assert report["cases"][0]["prefill_steps"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["mpt.json"]  # the temporary engine is gone
    printed = capsys.readouterr().out
    assert "of floor" in printed and "| batch |" in printed


def test_dummy_case_longer_than_the_config_stretches_its_positions():
    """MPT-7B has 2048 positions; the issue's 2048-token prefill with its outputs needs more (dummy weights only)."""
    options = BenchOptions(preset="mpt-tiny", batch_sizes=[1], input_len=510, output_len=8)
    plan, config = dummy_model_config(options)
    assert config.max_position_embeddings == 518 and plan.provenance["max_position_embeddings_of_the_config"] == 512
    assert bench_build_config(options, config).max_seq_len == 518
    plan, config = dummy_model_config(BenchOptions(preset="mpt-tiny", input_len=8, output_len=4))
    assert config.max_position_embeddings == 512 and "max_position_embeddings_of_the_config" not in plan.provenance


def test_matmul_rate_is_measured():
    assert physics.matmul_tflops(torch.device("cpu"), torch.bfloat16, n=64, reps=2) > 0


def test_expected_experts_formula_matches_simulation():
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3, 8):
        scores = torch.rand(4000, batch, 16, generator=gen)
        chosen = torch.zeros(4000, 16, dtype=torch.bool)
        chosen.scatter_(1, scores.topk(4, dim=-1).indices.view(4000, -1), True)
        simulated = chosen.sum(1).float().mean().item()
        assert simulated == pytest.approx(physics.expected_active_experts(16, 4, batch), rel=0.02)
    assert physics.expected_active_experts(16, 4, 1) == 4.0


def test_mean_decode_context_counts_every_step():
    for input_len, output_len in ((8, 4), (128, 64), (1, 2)):
        contexts = [input_len + j for j in range(1, output_len)]  # step j attends to input_len + j tokens
        assert physics.mean_decode_context(input_len, output_len) == pytest.approx(sum(contexts) / len(contexts))


@pytest.mark.parametrize("argv,message", [
    ([], "nothing to benchmark"),
    (["--preset", "gpt-9"], "unknown preset 'gpt-9'"),
    (["--preset", "dbrx-tiny", "--output_len", "1"], "--output_len must be >= 2"),
    (["--preset", "dbrx-tiny", "--batch_size", "0"], "--batch_size"),
    (["--engine_dir", "x", "--preset", "dbrx-tiny"], "not --engine_dir and --preset"),
    (["--engine_dir", "/nonexistent/engine"], "is not a directory"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys):
    assert kiln_main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kiln bench: error:") and message in err


def test_case_beyond_the_engine_limits_is_refused(dbrx_engine, capsys):
    assert kiln_main(["bench", "--engine_dir", str(dbrx_engine), "--batch_size", "5", "--input_len", "8",
                      "--output_len", "4"]) == 2
    assert "max_batch_size 4" in capsys.readouterr().err


def test_presets_are_all_known_to_bench():
    for name in PRESETS:
        BenchOptions(preset=name).validate()


def test_every_case_is_checked_before_the_first_runs(dbrx_engine, capsys):
    assert kiln_main(["bench", "--engine_dir", str(dbrx_engine), "--batch_size", "1", "2", "5", "--input_len", "8",
                      "--output_len", "4"]) == 2
    out = capsys.readouterr()
    assert "max_batch_size 4" in out.err and "batch    1:" not in out.out  # refused before batch 1 was timed


def test_a_later_failing_case_keeps_what_was_measured(dbrx_engine, tmp_path, monkeypatch, capsys):
    import kiln.bench.runner as runner

    timed = runner.time_kiln_case

    def fails_at_batch_2(llm, batch, *args, **kwargs):
        if batch == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return timed(llm, batch, *args, **kwargs)

    monkeypatch.setattr(runner, "time_kiln_case", fails_at_batch_2)
    out = tmp_path / "bench.json"
    assert kiln_main(["bench", "--engine_dir", str(dbrx_engine), "--batch_size", "1", "2", "--input_len", "8",
                      "--output_len", "4", "--warmup", "0", "--output_json", str(out)]) != 0
    report = json.loads(out.read_text())
    assert [c["batch_size"] for c in report["cases"]] == [1] and report["cases"][0]["decode_ms_per_step"] > 0
    assert report["error"] == "RuntimeError: CUDA out of memory (simulated)"
    printed = capsys.readouterr().out
    assert "measured 1 of 2 cases before: RuntimeError" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| batch | prefill ms") and [r.split("|")[1].strip() for r in rows[1:]] == ["1"]
