"""Hostile or damaged checkpoints: edited numbers, files outside the model directory, pickles, wrong JSON types.
Each case is refused with one line on stderr and exit code 2, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_dbrx import dbrx_published_config, hf_dbrx_model, save_published
from kiln.cli.main import main as kiln_main


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """One tiny DBRX in the published sharded layout (with an index), made once for the module."""
    cfg = dbrx_published_config()
    return save_published(hf_dbrx_model(cfg), cfg, tmp_path_factory.mktemp("pub") / "hf", shards=2)


@pytest.fixture()
def hf_dir(tmp_path, published) -> Path:
    return Path(shutil.copytree(published, tmp_path / "hf"))


def refused(tmp_path: Path, capsys, *args: str) -> str:
    """Run convert, expect exit 2 with a one-line error and no output or temporary directory; return the line."""
    out = tmp_path / "ckpt"
    assert kiln_main(["convert", *args, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kiln ")]  # the rest is tqdm's progress bar
    assert len(lines) == 1 and lines[0].startswith("kiln convert: error: ") and "Traceback" not in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]
    return lines[0]


def edit_config(model_dir: Path, **over) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(over)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def edit_index(model_dir: Path, name: str, target: str) -> None:
    path = model_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"][name] = target
    path.write_text(json.dumps(index))


def test_claimed_layers_checked_against_tensors_present(tmp_path, hf_dir, capsys):
    edit_config(hf_dir, n_layers=900)
    err = refused(tmp_path, capsys, "--model_dir", str(hf_dir))
    assert err.endswith(f"config.json in {hf_dir} claims 900 layers, but its weight files hold tensors for 2; fix "
                        "the layer count in config.json (or use --num_layers to keep fewer)")


def test_billion_layers_refused_at_once(tmp_path, hf_dir, capsys):
    edit_config(hf_dir, n_layers=10**9)
    err = refused(tmp_path, capsys, "--model_dir", str(hf_dir))
    assert "num_hidden_layers is 1000000000, outside kiln's bounds 1..1024" in err
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dbrx_published_config(n_layers=10**9)))
    assert "outside kiln's bounds 1..1024" in refused(tmp_path, capsys, "--config", str(config))


def test_absurd_dummy_model_refused_with_bytes(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dbrx_published_config(d_model=65536, n_heads=512, n_layers=1000,
                                                       ffn_config={"ffn_hidden_size": 500000})))
    err = refused(tmp_path, capsys, "--config", str(config))
    assert "this checkpoint needs " in err and " GB, and " in err and "GB free" in err


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_entries_outside_the_model_dir_refused(tmp_path, hf_dir, capsys, target):
    shutil.copy(hf_dir / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    edit_index(hf_dir, "lm_head.weight", target)
    err = refused(tmp_path, capsys, "--model_dir", str(hf_dir))
    assert f"names {target!r}, outside the model directory" in err


def test_symlink_escaping_the_model_dir_refused(tmp_path, hf_dir, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(hf_dir / "model-00002-of-00002.safetensors", outside)
    os.symlink(outside, hf_dir / "model-00002-of-00002.safetensors")
    err = refused(tmp_path, capsys, "--model_dir", str(hf_dir))
    assert "model-00002-of-00002.safetensors resolves to" in err and "(a symlink that escapes)" in err
    (hf_dir / "model.safetensors.index.json").unlink()  # the same without an index (files found by their suffix)
    assert "(a symlink that escapes)" in refused(tmp_path, capsys, "--model_dir", str(hf_dir))


def test_symlink_inside_the_model_dir_is_followed(tmp_path, hf_dir):
    inside = hf_dir / "blobs"
    inside.mkdir()
    shutil.move(hf_dir / "model-00002-of-00002.safetensors", inside / "x.safetensors")
    os.symlink(inside / "x.safetensors", hf_dir / "model-00002-of-00002.safetensors")
    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "ckpt")]) == 0


def test_pickle_refusal_is_one_line(tmp_path, capsys):
    model_dir = tmp_path / "bin"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(dbrx_published_config()))
    torch.save({"x": torch.zeros(2), "payload": Path("/tmp")}, model_dir / "pytorch_model.bin")
    err = refused(tmp_path, capsys, "--model_dir", str(model_dir))
    assert err.endswith(f"{model_dir / 'pytorch_model.bin'} holds Python objects besides tensors; kiln never "
                        "unpickles, so it cannot read this file: convert it to safetensors with a tool you trust")
    assert "weights_only=False" not in err


def test_integer_weights_refused(tmp_path, hf_dir, capsys):
    path = hf_dir / "model-00002-of-00002.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.int32)
    save_file(state, str(path))
    err = refused(tmp_path, capsys, "--model_dir", str(hf_dir))
    assert "lm_head.weight in" in err and "holds torch.int32 values where weights are floating point" in err


@pytest.mark.parametrize("edit, message", [
    ({"n_heads": 0}, "num_attention_heads is 0, outside kiln's bounds 1..4096"),
    ({"n_heads": -4}, "num_attention_heads is -4, outside kiln's bounds"),
    ({"n_heads": 3}, "3 attention heads of size 21 do not cover the hidden size 64"),
    ({"d_model": "64"}, "hidden_size must be an integer, got '64' (str)"),
    ({"vocab_size": None}, "vocab_size must be an integer, got None"),
    ({"n_layers": [2]}, "num_hidden_layers must be an integer, got [2]"),
    ({"attn_config": [1, 2]}, "config.json has a value of the wrong type for a dbrx config"),
    ({"vocab_size": 1.5}, "vocab_size must be an integer, got 1.5"),
])
def test_wrong_json_types_and_values_named(tmp_path, hf_dir, capsys, edit, message):
    edit_config(hf_dir, **edit)
    assert message in refused(tmp_path, capsys, "--model_dir", str(hf_dir))


def test_missing_key_and_absurd_nesting(tmp_path, hf_dir, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg["vocab_size"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert "config.json lacks 'vocab_size', which a dbrx config needs" in refused(tmp_path, capsys, "--model_dir",
                                                                                  str(hf_dir))
    (hf_dir / "config.json").write_text("[" * 100000 + "]" * 100000)
    assert "nested too deeply" in refused(tmp_path, capsys, "--model_dir", str(hf_dir))
    (hf_dir / "config.json").write_text("[1, 2]")
    assert "must hold a JSON object, not a list" in refused(tmp_path, capsys, "--model_dir", str(hf_dir))
