"""Engines carry their tokenizer (issue 19): convert copies the tokenizer's data files (never code) into the
checkpoint, build into the engine, and `LLM(engine)` / `kiln run` decode text without a tokenizer_dir. The output
guard of issue 18 accepts these files as kiln's own and still refuses any other."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import kiln
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from fixtures_tokenizers import build_neox_tokenizer_dir, build_remote_only_dir
from kiln.checkpoint.output_guard import foreign_files
from kiln.checkpoint.tokenizer_files import TOKENIZER_FILES
from kiln.cli.main import main as kiln_main
from kiln.tokenizer import TokenizerError

COPIED = {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}


def hf_dir_with_tokenizer(tmp: Path) -> Path:
    """A tiny MPT checkpoint whose directory also holds a NeoX tokenizer, a remote-code .py file (auto_map) and
    a README: only the tokenizer's data files may travel."""
    cfg = mpt_published_config(vocab_size=512)  # the tokenizer's ~400 ids must be in the model's vocabulary
    model_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf")
    build_neox_tokenizer_dir(model_dir, remote_auto_map=True, generation_eos=0)
    (model_dir / "README.md").write_text("not a tokenizer file")
    return model_dir


def convert_and_build(model_dir: Path, tmp: Path) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--dtype", "float32",
                      "--output_dir", str(tmp / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "24", "--max_seq_len", "48", "--no_tune"]) == 0
    return tmp / "engine"


@pytest.fixture()
def carried(tmp_path) -> tuple[Path, Path]:
    model_dir = hf_dir_with_tokenizer(tmp_path)
    return model_dir, convert_and_build(model_dir, tmp_path)


def test_convert_and_build_copy_only_tokenizer_data(tmp_path, carried):
    model_dir, engine = carried
    assert (model_dir / "tokenization_custom.py").is_file()  # the source had code; it must not travel
    for artifact in (tmp_path / "ckpt", engine):
        names = {p.name for p in artifact.iterdir()}
        assert COPIED <= names
        assert not any(n.endswith(".py") for n in names)
        assert "README.md" not in names
        assert (artifact / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
        assert foreign_files(artifact) == []


def test_llm_decodes_text_with_the_carried_tokenizer(carried):
    model_dir, engine = carried
    params = kiln.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    with kiln.LLM(str(engine), device="cpu") as llm:
        assert llm.tokenizer is not None
        own = llm.generate(["Hello world! The quick"], params)[0]
    with kiln.LLM(str(engine), tokenizer_dir=str(model_dir), device="cpu") as llm:
        given = llm.generate(["Hello world! The quick"], params)[0]
    assert own.prompt_token_ids == given.prompt_token_ids
    assert own.outputs[0].token_ids == given.outputs[0].token_ids
    assert own.outputs[0].text == given.outputs[0].text != ""


def test_run_prints_text_without_tokenizer_dir(carried, capsys):
    _, engine = carried
    assert kiln_main(["run", "--engine_dir", str(engine), "--device", "cpu", "--input_text", "The quick brown",
                      "--max_output_len", "4"]) == 0
    assert 'Input [Text 0]: "The quick brown"' in capsys.readouterr().out


def test_rerun_over_own_output_and_foreign_file_refused(tmp_path, carried, capsys):
    model_dir, engine = carried
    convert_and_build(model_dir, tmp_path)  # convert and build replace their own outputs, tokenizer files included
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "ckpt")]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"
    (engine / "tokenization_custom.py").write_text("# a user's file")
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(engine)]) == 2
    assert "tokenization_custom.py" in capsys.readouterr().err


def test_dummy_convert_has_no_tokenizer(tmp_path):
    out = tmp_path / "dummy"
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--output_dir", str(out)]) == 0
    assert not any((out / name).exists() for name in TOKENIZER_FILES)


def test_carried_tokenizer_kiln_cannot_load_is_skipped(tmp_path, caplog):
    """An engine whose carried tokenizer needs remote code still serves token ids (as before it carried one);
    an explicit tokenizer_dir of that kind is still an error."""
    cfg = mpt_published_config()
    model_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp_path / "hf")
    build_remote_only_dir(model_dir)
    engine = convert_and_build(model_dir, tmp_path)
    assert (engine / "tokenizer_config.json").is_file() and not (engine / "tokenization_foo.py").exists()
    with caplog.at_level(logging.WARNING, logger="kiln"):
        with kiln.LLM(str(engine), device="cpu") as llm:
            assert llm.tokenizer is None
            out = llm.generate([[1, 2, 3]], kiln.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2
    assert "tokenizer files cannot be loaded" in caplog.text
    with pytest.raises(TokenizerError, match="remote code"):
        kiln.LLM(str(engine), tokenizer_dir=str(engine), device="cpu")


def test_copies_are_plain_read_only_files(tmp_path, carried):
    _, engine = carried
    for name in COPIED:
        path = engine / name
        assert path.is_file() and not path.is_symlink()
        assert not os.access(path, os.W_OK) or os.geteuid() == 0
