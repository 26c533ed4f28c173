"""Engines carry their tokenizer: the tokenizer's data files travel from the Hugging Face directory into the kiln
checkpoint (`kiln convert`) and from the checkpoint into the engine (`kiln build`), so that `kiln.LLM(engine_dir)`
and `kiln run --engine_dir` produce text without --tokenizer_dir.

Only the data files named here are copied, never a .py file: kiln never runs code from a model directory
(kiln.tokenizer loads every tokenizer it supports without one), and an engine must not carry code that some other
tool might run with trust_remote_code. This module imports nothing heavy: output_guard uses its list of names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# The files kiln.tokenizer reads (tokenizer.json, tokenizer.model, vocab.json + merges.txt, tokenizer_config.json)
# and those transformers' loaders read beside them (special tokens, added tokens, generation_config.json's eos).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "generation_config.json",
)
# Any one of these makes a directory a tokenizer directory (generation_config.json alone is not a tokenizer).
_TOKENIZER_MARKERS: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer data files of `source` into `target` and return their names (none when `source` has no
    tokenizer). Symbolic links are followed (a Hugging Face cache snapshot links to its blobs): the copy is a plain
    file. The copies are read-only, like the rank files beside them."""
    if not has_tokenizer(source):
        return []
    copied = []
    for name in TOKENIZER_FILES:
        src = source / name
        if src.is_file():  # follows links; a directory or a dangling link of that name is not a data file
            shutil.copyfile(src, target / name)
            os.chmod(target / name, 0o444)
            copied.append(name)
    return copied


def has_tokenizer(directory: Path) -> bool:
    """True when `directory` holds tokenizer files (not only a generation_config.json)."""
    return any((directory / name).is_file() for name in _TOKENIZER_MARKERS)

