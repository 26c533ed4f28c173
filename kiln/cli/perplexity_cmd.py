"""kiln perplexity: per-token perplexity of an engine on a text file, over rolling windows, beside transformers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from kiln.cli.eval_args import data_type, free_memory, tokenizer_dir
from kiln.config import ConfigError
from kiln.eval.hf_reference import HFUnavailable, load_hf_reference
from kiln.eval.perplexity import PerplexityResult, Window, check_window, rolling_perplexity
from kiln.runtime_checks import runtime_device

HELP = "per-token perplexity of an engine on a text file (rolling windows), beside transformers"
HELDOUT = Path(__file__).resolve().parent.parent / "eval" / "data" / "heldout.txt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine_dir", default="kiln_engine", help="the kiln engine to measure")
    p.add_argument("--text_file", default=None, help="UTF-8 text to score (default: kiln's shipped held-out text, "
                                                     "kiln/eval/data/heldout.txt)")
    p.add_argument("--hf_model_dir", help="also score the same windows with transformers on this checkpoint; the "
                                          "tokenizer when --tokenizer_dir is not given")
    p.add_argument("--tokenizer_dir", help="tokenizer directory (default: --hf_model_dir, else the tokenizer "
                                            "the engine carries)")
    p.add_argument("--max_length", type=int, default=None, help="tokens per window (default: the engine's "
                                                                "max_seq_len)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window after the first "
                                                            "(default: max_length / 2)")
    p.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens (quick runs)")
    p.add_argument("--data_type", "--hf_data_type", dest="data_type", default=None,
                   help="transformers' dtype: fp32, fp16, bf16 (default: the engine's)")
    p.add_argument("--output_json", help='write {"perplexity", "tokens", ...} (and "hf_perplexity")')
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def read_text(args: argparse.Namespace) -> str:
    path = Path(args.text_file) if args.text_file else HELDOUT
    if not path.is_file():
        if args.text_file:
            raise ConfigError(f"--text_file {path} does not exist")
        raise ConfigError(f"kiln's held-out text {path} is not there (this kiln ships none); pass --text_file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--text_file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise ConfigError(f"{path} holds no text")
    return text


def window_sizes(args: argparse.Namespace, max_seq_len: int) -> tuple[int, int]:
    max_length = args.max_length if args.max_length is not None else max_seq_len
    if max_length > max_seq_len:
        raise ConfigError(f"--max_length {max_length} exceeds the engine's max_seq_len {max_seq_len}; pass "
                          f"--max_length {max_seq_len} or less")
    stride = args.stride if args.stride is not None else max(1, max_length // 2)
    check_window(max_length, stride)
    return max_length, stride


def progress(name: str):
    from tqdm import tqdm

    def wrap(items: Iterator[Window], total: int) -> Iterator[Window]:
        return iter(tqdm(items, total=total, desc=f"{name} perplexity", unit="window", file=sys.stderr,
                         dynamic_ncols=True))

    return wrap


def timed(name: str, ids: list[int], logits_fn, max_length: int, stride: int) -> tuple[PerplexityResult, float]:
    start = time.perf_counter()
    result = rolling_perplexity(ids, logits_fn, max_length, stride, progress(name))
    return result, time.perf_counter() - start


def hf_perplexity(args: argparse.Namespace, ids: list[int], dtype: torch.dtype, max_length: int,
                  stride: int) -> tuple[PerplexityResult, float] | None:
    """transformers on the same windows; None (after one line saying why) where it cannot run the model."""
    if args.data_type is not None:
        dtype = data_type(args.data_type)
    try:
        ref = load_hf_reference(args.hf_model_dir, dtype, runtime_device(args.device))
    except HFUnavailable as err:
        print(f"kiln perplexity: {err}", file=sys.stderr)
        return None
    for note in ref.notes:
        print(f"kiln perplexity: note: {note}", file=sys.stderr)
    return timed("hf", ids, ref.logits, max_length, stride)


def main(args: argparse.Namespace) -> int:
    from kiln.llm import LLM
    from kiln.tokenizer import load_tokenizer

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError(f"--max_tokens is {args.max_tokens}; perplexity needs at least 2 tokens")
    text = read_text(args)
    tokenizer = load_tokenizer(tokenizer_dir(args))
    llm = LLM(args.engine_dir, device=args.device)
    try:
        max_length, stride = window_sizes(args, llm.build.max_seq_len)
        ids = tokenizer.encode(text)[: args.max_tokens]
        dtype = llm.info.model.torch_dtype
        result, seconds = timed("kiln", ids, llm.score, max_length, stride)
    finally:
        llm.close()
        del llm
        free_memory()
    print(f"kiln perplexity: {result.perplexity:.6f} over {result.tokens} tokens (windows of {max_length}, stride "
          f"{stride}; {seconds:.2f} s)")
    out = {"perplexity": result.perplexity, "tokens": result.tokens, "nll": result.nll, "max_length": max_length,
           "stride": stride, "time_s": seconds}
    hf = hf_perplexity(args, ids, dtype, max_length, stride) if args.hf_model_dir else None
    if hf is not None:
        hf_result, hf_seconds = hf
        rel = abs(result.perplexity - hf_result.perplexity) / hf_result.perplexity
        print(f"transformers perplexity: {hf_result.perplexity:.6f} over {hf_result.tokens} tokens "
              f"({hf_seconds:.2f} s); relative difference {rel:.2e}")
        out.update(hf_perplexity=hf_result.perplexity, hf_time_s=hf_seconds, relative_difference=rel)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(out, indent=1) + "\n")
    return 0
