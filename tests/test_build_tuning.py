"""Kernel choices made at build and used at load: the engine's "kernels" section is written (defaults on the CPU or
with --no_tune), read back, and a tuned config recorded for this device is what fused_moe looks up afterwards; one
tuned on another GPU is ignored with one warning. The tuning itself runs on a GPU (`gpu` marker)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from kiln.checkpoint.kiln_format import load_artifact
from kiln.cli.main import main as kiln_main
from kiln.kernels import apply_engine_kernel_choices, device_name, kernels_section, select_kernels
from kiln.kernels import triton_moe_configs as table
from kiln.kernels.triton_moe_configs import GemmTile, MoeConfig

CPU = torch.device("cpu")
CUSTOM = MoeConfig(32, 2, GemmTile(32, 64, 4, 2), GemmTile(64, 32, 8, 3))  # unlike any default


@pytest.fixture(autouse=True)
def clean_table():
    """Each test starts and ends with an empty config table (other tests' registrations must not leak)."""
    saved = table.registered_moe_configs()
    table.clear_moe_configs()
    yield
    table.clear_moe_configs()
    for key, config in saved.items():
        table.register_moe_config(key, config)


def build_engine(tmp: Path, preset: str, *extra: str) -> Path:
    assert kiln_main(["convert", "--preset", preset, "--num_layers", "1", "--dtype", "float32", "--output_dir",
                      str(tmp / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "16", "--max_seq_len", "32", "--max_num_tokens", "100", *extra]) == 0
    return tmp / "engine"


@pytest.fixture(scope="module")
def moe_engine(tmp_path_factory) -> Path:
    return build_engine(tmp_path_factory.mktemp("tuning"), "dbrx-tiny", "--no_tune")


def with_tuned_entry(engine: Path, device: str, bucket: int) -> dict:
    """The engine's config with one entry marked tuned (as a GPU build records it) and set to CUSTOM."""
    raw = json.loads((engine / "config.json").read_text())
    raw["kernels"]["device"], raw["kernels"]["tuned"] = device, True
    for entry in raw["kernels"]["fused_moe"]["configs"]:
        if entry["tokens"] == bucket:
            entry.update(tuned=True, **table.config_to_dict(CUSTOM))
    return raw


def test_build_records_default_tiles_for_every_token_bucket(moe_engine):
    section = load_artifact(moe_engine, "engine").raw["kernels"]
    assert section["format"] == 1 and section["device"] == "cpu" and section["tuned"] is False
    moe = section["fused_moe"]
    # dbrx-tiny, one rank: hidden 64, ffn 96, 4 experts, top 2; max_num_tokens 100 -> buckets 1 ... 128
    assert (moe["hidden"], moe["ffn"], moe["experts"], moe["top_k"], moe["dtype"]) == (64, 96, 4, 2, "float32")
    assert [c["tokens"] for c in moe["configs"]] == [1, 2, 4, 8, 16, 32, 64, 128]
    for entry in moe["configs"]:
        assert entry["tuned"] is False
        assert table.config_from_dict(entry) == table.default_moe_config(entry["tokens"], 2, 4)
    assert section["attention"]["tuned"] is False


def test_dense_model_records_no_moe_choice(tmp_path):
    section = load_artifact(build_engine(tmp_path, "mpt-tiny"), "engine").raw["kernels"]
    assert section["fused_moe"] is None and section["tuned"] is False


def test_expert_parallel_rank_shape_is_recorded(tmp_path):
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--num_layers", "1", "--tp_size", "2", "--moe_tp_mode",
                      "1", "--output_dir", str(tmp_path / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "e"),
                      "--max_input_len", "16", "--max_seq_len", "32", "--max_num_tokens", "8"]) == 0
    moe = load_artifact(tmp_path / "e", "engine").raw["kernels"]["fused_moe"]
    assert (moe["experts"], moe["ffn"]) == (2, 96)  # 4 experts over 2 ranks, each expert whole


def test_config_json_round_trip_and_bad_entries():
    assert table.config_from_dict(table.config_to_dict(CUSTOM)) == CUSTOM
    for bad in ({"block_m": 24, "group_m": 1, "up": [1, 1, 1, 1], "down": [1, 1, 1, 1]},
                {"block_m": 16, "group_m": 1, "up": [64, 64, 4], "down": [1, 1, 1, 1]},
                {"block_m": 16, "group_m": 0, "up": [1, 1, 1, 1], "down": [1, 1, 1, 1]}, {"block_m": 16}):
        with pytest.raises(ValueError):
            table.config_from_dict(bad)


def test_recorded_config_is_registered_on_load(moe_engine):
    raw = with_tuned_entry(moe_engine, "cpu", 8)
    assert table.lookup_moe_config(7, 64, 96, 4, 2) == table.default_moe_config(7, 2, 4)
    line = apply_engine_kernel_choices(raw, CPU)
    assert "1 tuned" in line
    assert table.lookup_moe_config(5, 64, 96, 4, 2) == CUSTOM  # 5..8 tokens share bucket 8
    assert table.lookup_moe_config(9, 64, 96, 4, 2) == table.default_moe_config(9, 2, 4)  # untuned bucket 16
    assert table.lookup_moe_config(8, 64, 48, 4, 2) != CUSTOM  # another shape


def test_select_kernels_registers_the_engine_choices(moe_engine):
    kernels = select_kernels(CPU, "triton", engine_config=with_tuned_entry(moe_engine, "cpu", 16))
    assert kernels.name == "triton" and table.lookup_moe_config(16, 64, 96, 4, 2) == CUSTOM
    table.clear_moe_configs()
    select_kernels(CPU, "torch", engine_config=with_tuned_entry(moe_engine, "cpu", 16))  # torch has no tiles
    assert table.registered_moe_configs() == {}


def test_engine_tuned_on_another_gpu_uses_defaults_and_warns_once(moe_engine):
    raw = with_tuned_entry(moe_engine, "NVIDIA Imaginary X1", 8)
    with pytest.warns(RuntimeWarning, match="tuned on NVIDIA Imaginary X1.*using the default tiles"):
        line = apply_engine_kernel_choices(raw, CPU)
    assert "defaults" in line and table.registered_moe_configs() == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second load says nothing more
        apply_engine_kernel_choices(raw, CPU)


def test_old_or_broken_sections(moe_engine):
    raw = json.loads((moe_engine / "config.json").read_text())
    assert "defaults" in apply_engine_kernel_choices({k: v for k, v in raw.items() if k != "kernels"}, CPU)
    with pytest.raises(ValueError, match="format 7.*rebuild"):
        apply_engine_kernel_choices(dict(raw, kernels=dict(raw["kernels"], format=7)), CPU)
    broken = with_tuned_entry(moe_engine, "cpu", 8)
    del broken["kernels"]["fused_moe"]["hidden"]
    with pytest.raises(ValueError, match="malformed"):
        apply_engine_kernel_choices(broken, CPU)


def test_token_buckets_and_block_m_candidates():
    assert table.token_buckets(1) == [1] and table.token_buckets(8192)[-1] == 4096
    assert table.token_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 128]
    from kiln.kernels.triton_moe import block_m_candidates

    assert block_m_candidates(1, 4, 16) == (16,)  # decode: blocks beyond 16 rows would be padding
    assert block_m_candidates(4096, 4, 16) == (16, 32, 64, 128)


def table_shape():
    from kiln.kernels import MoeShape

    return MoeShape(hidden=64, ffn=96, experts=4, top_k=2)


def test_nothing_is_tuned_without_a_gpu():
    section = kernels_section(CPU, table_shape(), torch.float32, 4, tune=True)
    assert section["tuned"] is False and [c["tuned"] for c in section["fused_moe"]["configs"]] == [False] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_build_tunes_and_load_uses_the_stored_configs(monkeypatch):
    from kiln.kernels import reference, triton_moe

    used = []
    lookup = triton_moe.lookup_moe_config
    monkeypatch.setattr(triton_moe, "lookup_moe_config", lambda *a: used.append(lookup(*a)) or used[-1])

    device = torch.device("cuda")
    section = kernels_section(device, table_shape(), torch.bfloat16, 4, tune=True)
    assert section["tuned"] and section["device"] == device_name(device)
    stored = {c["tokens"]: table.config_from_dict(c) for c in section["fused_moe"]["configs"]}
    assert list(stored) == [1, 2, 4] and all(c["tuned"] for c in section["fused_moe"]["configs"])
    table.clear_moe_configs()
    raw = {"kernels": json.loads(json.dumps(section))}  # as written to and read from config.json
    assert "3 tuned" in apply_engine_kernel_choices(raw, device)
    for tokens, config in stored.items():
        assert table.lookup_moe_config(tokens, 64, 96, 4, 2) == config
        x = torch.randn(tokens, 64, dtype=torch.bfloat16, device=device)
        w13 = torch.randn(4, 192, 64, dtype=torch.bfloat16, device=device) * 0.1
        w2 = torch.randn(4, 64, 96, dtype=torch.bfloat16, device=device) * 0.1
        weights, ids = torch.rand(tokens, 4, device=device).softmax(-1).topk(2, dim=-1)
        out = triton_moe.fused_moe(x, w13, w2, weights, ids)
        assert used[-1] == config  # the launch took the stored tiles
        torch.testing.assert_close(out.float(), reference.fused_moe(x, w13, w2, weights, ids).float(), rtol=2e-2,
                                   atol=2e-2)


def test_build_describes_its_kernel_choices():
    from kiln.cli.build_cmd import describe_kernels

    assert "no build-time choices" in describe_kernels({})
    entries = [{"rows": 1, "n": 64, "k": 32, "tuned": True, "kernel": k, "config": None} for k in ("triton", "cublas")]
    section = {"device": "NVIDIA H200", "tuned": True, "tune_seconds": 12.0, "linear": {"entries": entries},
               "fused_moe": {"configs": [{"tokens": 1, "tuned": True}, {"tokens": 2, "tuned": False}]}}
    line = describe_kernels(section)
    assert "on NVIDIA H200 in 12 s" in line and "1 of 2 token buckets" in line and "Triton wins 1 of 2" in line


def test_failed_decode_matmul_tuning_leaves_cublas_and_a_warning(monkeypatch):
    """Tuning must never fail a build: if it breaks, every shape records cuBLAS, untuned."""
    import kiln.kernels as kernels
    from kiln.kernels import triton_gemv

    def broken(*args, **kwargs):
        raise RuntimeError("ptxas died")

    monkeypatch.setattr(triton_gemv, "tune_linear_shapes", broken)
    with pytest.warns(UserWarning, match="ptxas died"):
        part = kernels._linear_section([(64, 32), (32, 64)], torch.float16, torch.device("cuda"), True, 1.0, None)
    assert part["entries"] and all(e["kernel"] == "cublas" and not e["tuned"] for e in part["entries"])


def test_failed_moe_tuning_keeps_default_tiles_and_warns(monkeypatch):
    import kiln.kernels as kernels
    from kiln.kernels import triton_moe

    def broken(*args, **kwargs):
        raise RuntimeError("no tile compiled")

    monkeypatch.setattr(triton_moe, "tune_moe_buckets", broken)
    shape = kernels.MoeShape(hidden=64, ffn=96, experts=4, top_k=2)
    with pytest.warns(UserWarning, match="no tile compiled"):
        part = kernels._moe_section(shape, torch.float16, torch.device("cuda"), 64, True, 1.0, None)
    assert part["configs"] and not any(c["tuned"] for c in part["configs"])
