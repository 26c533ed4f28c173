"""`kiln run`'s checks of its flags and input files, made before the engine is loaded or anything generated: a run
that would fail only when writing its results (an --output_csv that is a directory) fails at once instead, and
input files that are not token ids are refused naming the file and row."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np

from kiln.config import ConfigError

DEFAULT_TEMPERATURE = 1.0  # run.py's defaults, which `kiln run` keeps: --top_k 1 decodes greedily
DEFAULT_TOP_K = 1
OUTPUT_FLAGS = ("output_json", "output_csv", "output_npy", "output_log_probs_npy", "output_logits_npy",
                "output_cum_log_probs_npy")


def check_run_args(args: argparse.Namespace) -> None:
    """Refuse flag values that would otherwise be ignored, misread or found wrong only after generating."""
    if args.max_input_length is not None and args.max_input_length < 1:
        raise ConfigError(f"--max_input_length must be >= 1 (the number of last prompt tokens to keep), got "
                          f"{args.max_input_length}")
    if args.max_output_len < 1:
        raise ConfigError(f"--max_output_len must be >= 1, got {args.max_output_len}")
    # Checked even under greedy decoding (--top_k 1), which ignores it: a NaN or negative value is a mistake.
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.streaming_interval < 1:
        raise ConfigError(f"--streaming_interval must be >= 1, got {args.streaming_interval}")
    fraction = args.kv_cache_free_gpu_memory_fraction
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"--kv_cache_free_gpu_memory_fraction must be in (0, 1], got {fraction}")
    check_output_paths(args)


def check_output_paths(args: argparse.Namespace) -> None:
    """Every output file must be writable where it is named: not a directory, in an existing directory, each flag a
    different file."""
    seen: dict[Path, str] = {}
    for flag in OUTPUT_FLAGS:
        value = getattr(args, flag, None)
        if not value:
            continue
        path = Path(value)
        if path.is_dir():
            raise ConfigError(f"--{flag} {path} is a directory; name a file")
        if not path.parent.is_dir():
            raise ConfigError(f"--{flag} {path}: the directory {path.parent} does not exist; create it first")
        real = path.resolve()
        if real in seen:
            raise ConfigError(f"--{flag} and --{seen[real]} name the same file {path}; give each its own")
        seen[real] = flag


def read_csv_prompts(path: Path) -> list[list[int]]:
    """Token ids per row of a CSV file; a cell that is not an integer is named by file, row and column."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as err:
        raise ConfigError(f"--input_file {path} is not a text CSV file ({err.reason} at byte {err.start}); give "
                          "token ids separated by commas, one prompt per row") from err
    except csv.Error as err:
        raise ConfigError(f"--input_file {path} is not a CSV file: {err}") from err
    prompts = []
    for number, row in enumerate(rows, start=1):
        if not row:
            continue
        ids = []
        for column, cell in enumerate(row, start=1):
            try:
                ids.append(int(cell.strip()))
            except ValueError:
                raise ConfigError(f"--input_file {path} row {number} column {column}: {cell[:40]!r} is not a token "
                                  "id (an integer)") from None
        prompts.append(ids)
    return prompts


def read_npy_prompts(path: Path, pad: int | None) -> list[list[int]]:
    """Token ids per row of an integer .npy array (padding `pad` dropped); floats are refused, not truncated."""
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ConfigError(f"--input_file {path} is not a numpy array file without Python objects: {err}") from err
    if not np.issubdtype(rows.dtype, np.integer):
        raise ConfigError(f"--input_file {path} holds {rows.dtype} values; token ids must be an integer array (a "
                          "float would be truncated into another token)")
    if rows.ndim > 2:
        raise ConfigError(f"--input_file {path} has {rows.ndim} dimensions; give [prompts, tokens] or [tokens]")
    return [[int(x) for x in row if pad is None or x != pad] for row in np.atleast_2d(rows)]


def sampling_flags_ignored(args: argparse.Namespace) -> list[str]:
    """The flags that ask for sampling while --top_k is left at run.py's default of 1, which decodes greedily and so
    ignores them. Not under beam search (its sequences differ without sampling), nor --temperature 0 (greedy too)."""
    if args.top_k != DEFAULT_TOP_K or args.num_beams > 1:
        return []
    asked = []
    if args.temperature not in (DEFAULT_TEMPERATURE, 0.0):
        asked.append(f"--temperature {args.temperature:g}")
    if 0 < args.top_p < 1:  # 0 is run.py's "off"; 1 keeps every token
        asked.append(f"--top_p {args.top_p:g}")
    if (args.num_return_sequences or 1) > 1:
        asked.append(f"--num_return_sequences {args.num_return_sequences}")
    return asked


def greedy_note(args: argparse.Namespace) -> str | None:
    """One line telling the user that their sampling flags do nothing under run.py's --top_k 1, and how to sample;
    None when no flag asks for sampling. The default stays run.py's: scripts written for run.py keep their output."""
    asked = sampling_flags_ignored(args)
    if not asked:
        return None
    return (f"kiln run: decoding is greedy because --top_k is 1 (run.py's default), which ignores {', '.join(asked)}; "
            "pass --top_k 0 (no top-k limit) or --top_k N > 1 to sample")
