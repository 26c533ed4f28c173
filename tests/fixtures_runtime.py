"""Tiny fp32 DBRX and MPT engines for runtime tests: a 6-token step budget chunks longer prompts and blocks of 4
tokens make a small KV cache easy to exhaust (preemption), so batching, chunked prefill and preemption all happen
on a few short prompts."""

from __future__ import annotations

from pathlib import Path

from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from kiln.cli.main import main as kiln_main

BLOCK = 4
PROMPTS = [[5, 17, 33, 2, 99, 150, 7], [250, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [42],
           [7, 7, 8, 9, 100, 101, 102, 103, 104], [60, 61, 62, 63, 64]]


def tiny_checkpoint(tmp: Path, family: str) -> Path:
    """A random Hugging Face checkpoint of the tiny DBRX or MPT config (its directory)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if family == "dbrx":
        model_dir, _, _ = make_dbrx_checkpoint(tmp)
        return model_dir
    cfg = mpt_published_config()
    return save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf")


def build_small_step_engine(tmp: Path, model_dir: Path, *convert_args: str, max_seq_len: int = 48) -> Path:
    """Convert (with `convert_args`, e.g. a tp size) and build into tmp/engine: max_input_len 24, 6-token steps,
    blocks of BLOCK tokens, 8 sequences."""
    assert kiln_main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), *convert_args]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_input_len", "24", "--max_seq_len", str(max_seq_len), "--max_num_tokens", "6",
                      "--kv_block_size", str(BLOCK), "--max_batch_size", "8"]) == 0
    return tmp / "engine"
