"""`kiln bench` on multi-rank engines (CPU, gloo): the per-GPU floor's parts against the rank files (pipeline
stages add up to the one-rank model, expert parallel halves the experts), one spawned tp 2 engine benched end to
end (JSON consistent with its definition), and the one-line refusals (--compare_hf is single-rank)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from kiln.bench import BenchOptions, multirank, physics
from kiln.bench.dummy import dummy_model_config
from kiln.checkpoint.kiln_format import load_artifact
from kiln.cli.main import main as kiln_main
from kiln.config import ConfigError
from kiln.memory import MemoryPlan

CASE = ["--batch_size", "1", "3", "--input_len", "8", "--output_len", "4", "--warmup", "0"]


def make_engine(tmp: Path, *shard: str) -> Path:
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--num_layers", "2", "--dtype", "float32", "--seed", "3",
                      "--output_dir", str(tmp / "ckpt"), *shard]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_batch_size", "4", "--max_input_len", "16", "--max_seq_len", "32"]) == 0
    return tmp / "engine"


def file_bytes(path: Path, select=lambda name: True) -> int:
    """Bytes of a rank file's tensors whose names `select` accepts, read from the file."""
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if select(name):
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    return total


def is_expert(name: str) -> bool:
    return name.endswith((".w13", ".w2"))


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bench_parallel")
    return {"one": make_engine(tmp / "one"), "pp2": make_engine(tmp / "pp2", "--pp_size", "2"),
            "ep2": make_engine(tmp / "ep2", "--tp_size", "2", "--moe_tp_mode", "1")}


def test_staged_bytes_match_rank_files(engines):
    one = load_artifact(engines["one"], "engine")
    one_bytes = physics.weight_bytes(one, MemoryPlan(**one.raw["memory_plan"]))
    pp = multirank.staged_weight_bytes(load_artifact(engines["pp2"], "engine"))
    stage_files = [file_bytes(engines["pp2"] / f"rank{r}.safetensors") for r in (0, 1)]
    assert [s.total for s in pp.stages] == stage_files
    assert sum(stage_files) == file_bytes(engines["one"] / "rank0.safetensors") == one_bytes.total
    for batch in (1, 3, 64):  # stages run one after another: the step streams what one rank streams
        assert pp.active(batch) == pytest.approx(one_bytes.active(batch))
    assert pp.total == max(stage_files)
    ep_info = load_artifact(engines["ep2"], "engine")
    ep = multirank.staged_weight_bytes(ep_info)
    experts_per_rank = [file_bytes(engines["ep2"] / f"rank{r}.safetensors", is_expert) for r in (0, 1)]
    assert experts_per_rank[0] == experts_per_rank[1] == ep.experts == one_bytes.experts // 2
    assert ep.total == max(file_bytes(engines["ep2"] / f"rank{r}.safetensors") for r in (0, 1))
    # KV: every stage's share of one token, together the one-rank figure (the tiny DBRX has 8 KV heads: tp 2 halves)
    assert multirank.staged_kv_bytes_per_token(load_artifact(engines["pp2"], "engine")) == \
        one.raw["memory_plan"]["kv_bytes_per_token"]
    assert multirank.staged_kv_bytes_per_token(ep_info) * 2 == one.raw["memory_plan"]["kv_bytes_per_token"]


def test_bench_of_a_two_rank_engine(engines, tmp_path):
    out = tmp_path / "ep2.json"
    assert kiln_main(["bench", "--engine_dir", str(engines["ep2"]), *CASE, "--device", "cpu", "--output_json",
                      str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["engine"]["world_size"] == 2
    assert report["engine"]["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 1,
                                           "moe_ep_size": 2}
    weights = multirank.staged_weight_bytes(load_artifact(engines["ep2"], "engine"))
    kv = report["engine"]["kv_bytes_per_token"]
    assert any("per GPU" in note for note in report["notes"])
    assert [c["batch_size"] for c in report["cases"]] == [1, 3]
    for case in report["cases"]:
        batch = case["batch_size"]
        assert case["decode_steps"] == 3 and case["tokens_per_s"] > 0
        assert case["active_weight_bytes"] == pytest.approx(weights.active(batch))
        assert case["kv_bytes_per_step"] == pytest.approx(batch * physics.mean_decode_context(8, 4) * kv)
        floor = (case["active_weight_bytes"] + case["kv_bytes_per_step"]) / (report["bandwidth_gbs"] * 1e9) * 1e3
        assert case["floor_ms_per_step"] == pytest.approx(floor)
        assert case["fraction_of_floor"] == pytest.approx(floor / case["decode_ms_per_step"])


def test_refusals(engines):
    with pytest.raises(ConfigError, match="--compare_hf runs transformers on one GPU, and this engine has 2 ranks"):
        from kiln.bench import run_bench

        run_bench(BenchOptions(engine_dir=str(engines["ep2"]), compare_hf=True, device="cpu"))
    with pytest.raises(ConfigError, match="single-rank"):
        BenchOptions(preset="dbrx-tiny", tp_size=2, compare_hf=True).validate()
    with pytest.raises(ConfigError, match="already sharded"):
        BenchOptions(engine_dir=str(engines["one"]), tp_size=2).validate()
    with pytest.raises(ConfigError, match="--pp_size 3 exceeds the model's 2 layers"):
        dummy_model_config(BenchOptions(preset="dbrx-tiny", num_layers=2, pp_size=3))
    with pytest.raises(ConfigError, match="--moe_tp_size × --moe_ep_size must equal --tp_size 2"):
        dummy_model_config(BenchOptions(preset="dbrx-tiny", tp_size=2, moe_ep_size=3))


def test_dummy_options_shard_as_convert():
    for argv, expected in ((dict(tp_size=2, moe_tp_mode=1), (2, 2, 1, 1, 2)), (dict(tp_size=2), (2, 2, 1, 2, 1)),
                           (dict(tp_size=2, pp_size=2, moe_ep_size=2), (4, 2, 2, 1, 2))):
        plan, _ = dummy_model_config(BenchOptions(preset="dbrx-tiny", num_layers=2, **argv))
        m = plan.mapping
        assert (m.world_size, m.tp_size, m.pp_size, m.moe_tp_size, m.moe_ep_size) == expected
    plan, _ = dummy_model_config(BenchOptions(preset="mpt-tiny", tp_size=2))
    assert (plan.mapping.moe_tp_size, plan.mapping.moe_ep_size) == (2, 1)
