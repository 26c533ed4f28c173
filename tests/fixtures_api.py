"""A tiny MPT Hugging Face checkpoint with a GPT-NeoX tokenizer in its directory, for the tests of the first hour
(issue 19): the Python API, the one-step cache, the CLI and the docs' snippets."""

from __future__ import annotations

from pathlib import Path

from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from fixtures_tokenizers import build_neox_tokenizer_dir


def tiny_hf_dir(path: Path) -> Path:
    cfg = mpt_published_config(vocab_size=512, max_seq_len=64)  # the tokenizer's ids fit the vocabulary
    model_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, path)
    build_neox_tokenizer_dir(model_dir, generation_eos=0)
    return model_dir
