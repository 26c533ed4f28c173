"""What `kiln summarize` and `kiln perplexity` share: where the tokenizer comes from, transformers' dtype, and
freeing one model's memory before the next loads."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from kiln.checkpoint.tokenizer_files import has_tokenizer
from kiln.config import ConfigError, torch_dtype

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def tokenizer_dir(args: argparse.Namespace) -> str:
    """--tokenizer_dir, else --hf_model_dir, else the engine directory if it holds tokenizer files (convert and build
    copy them from the Hugging Face directory)."""
    found = args.tokenizer_dir or args.hf_model_dir
    if found:
        return found
    engine = Path(args.engine_dir)
    if has_tokenizer(engine):
        return str(engine)
    raise ConfigError(f"kiln {args.command} needs a tokenizer and the engine carries none: pass --tokenizer_dir or "
                      "--hf_model_dir")


def data_type(name: str) -> torch.dtype:
    """--data_type: summarize.py's fp32/fp16/bf16 or kiln's float32/float16/bfloat16."""
    return torch_dtype(DTYPE_ALIASES.get(name, name))


def free_memory() -> None:
    """Give a model's memory back before the next one loads (summarize.py deletes its runner likewise)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
