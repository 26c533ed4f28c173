"""Tiny checkpoints with a tokenizer, calibration text and engines for the INT8/FP8 KV-cache tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from fixtures_runtime import BLOCK
from fixtures_tokenizers import build_neox_tokenizer_dir
from kiln.cli.main import main as kiln_main
from kiln.quant.calib_data import DEFAULT_TEXT

FORMATS = {"int8": "--int8_kv_cache", "fp8": "--fp8_kv_cache"}


def tiny_hf_dir(tmp: Path, family: str) -> Path:
    """A tiny random checkpoint with a GPT-NeoX style tokenizer (402 ids: the vocabulary is widened to 512)."""
    if family == "dbrx":
        model_dir, _, _ = make_dbrx_checkpoint(tmp, vocab_size=512)
    else:
        cfg = mpt_published_config(vocab_size=512)
        model_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf")
    build_neox_tokenizer_dir(tmp / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp / "tok" / name, model_dir / name)
    return model_dir


def calib_text(tmp: Path) -> Path:
    text = DEFAULT_TEXT.read_text(encoding="utf-8")[:6000]
    (tmp / "calib.txt").write_text(text, encoding="utf-8")
    return tmp / "calib.txt"


def convert_build(tmp: Path, model_dir: Path, *flags: str) -> Path:
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), "--dtype",
                      "float32", *flags]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "24", "--max_seq_len", "48", "--max_num_tokens", "6", "--kv_block_size",
                      str(BLOCK), "--max_batch_size", "8"]) == 0
    return tmp / "engine"
