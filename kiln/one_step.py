"""One step from a Hugging Face checkpoint to a running engine, for vLLM and transformers users:
`kiln.LLM("path/to/hf_checkpoint")` and `kiln run --model_dir ...` convert and build into a cache and reuse the
engine the next time. The convert -> build -> run path is unchanged; this is it, run once and remembered.

The cache lives in $KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln; each engine is
`engines/<name>-<key>`, where the key hashes the checkpoint (config.json and index bytes, every file's name, size
and mtime) and the options (dtype, parallel sizes, build limits) together with kiln's format version. The build
writes the entry atomically (kiln.checkpoint.atomic), so an interrupted one-step leaves no half entry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from kiln.config import FORMAT_VERSION, ConfigError

CACHE_ENV = "KILN_CACHE_DIR"
# Files whose bytes enter the key (small, and they define the model); every other file enters by size and mtime.
_HASHED_BYTES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                 "generation_config.json")


@dataclass(frozen=True)
class OneStepOptions:
    """What the convert and build of a one-step engine are told; every field is part of the cache key. None
    means the command's default (the checkpoint's dtype; max_seq_len the model's max_position_embeddings;
    max_input_len as `kiln build` chooses it)."""

    dtype: str | None = None
    tp_size: int = 1
    pp_size: int = 1
    max_batch_size: int = 8
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    kv_block_size: int | None = None
    # vLLM takes any prompt shorter than the context: max_input_len max_seq_len - 1 unless given.
    prompts_up_to_seq_len: bool = False


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV, "").strip():
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "kiln"


def is_kiln_artifact(path: str | Path) -> bool:
    """True for a kiln checkpoint or engine directory (its config.json names a kiln format version)."""
    config = Path(path) / "config.json"
    try:
        return "kiln_format_version" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def checkpoint_fingerprint(model_dir: Path) -> dict:
    """What identifies a checkpoint's contents without reading its weights: the bytes of its small defining files
    and every file's name, size and modification time."""
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} has no config.json: give a Hugging Face model directory or a kiln engine "
                          "(kiln reads local directories only, it never downloads)")
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    hashed = {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
              for name in _HASHED_BYTES if (model_dir / name).is_file()}
    return {"files": stats, "hashed": hashed}


def cache_key(model_dir: Path, options: OneStepOptions) -> str:
    data = {"format": FORMAT_VERSION, "checkpoint": checkpoint_fingerprint(model_dir), "options": asdict(options)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def cached_engine_dir(model_dir: str | Path, options: OneStepOptions, root: Path | None = None) -> Path:
    """Where the engine of `model_dir` with `options` lives (or will) in the cache."""
    model_dir = Path(model_dir).resolve()
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_dir.name) or "model"
    return (root or cache_root()) / "engines" / f"{name}-{cache_key(model_dir, options)}"


def engine_for(model_dir: str | Path, options: OneStepOptions, root: Path | None = None,
               say: Callable[[str], None] | None = None) -> Path:
    """The engine of a Hugging Face checkpoint: from the cache, or converted and built into it now. Says which
    (one line, on stderr by default)."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    entry = cached_engine_dir(model_dir, options, root)
    if is_kiln_artifact(entry):
        say(f"kiln: using the cached engine {entry} for {model_dir}")
        return entry
    _convert_and_build(Path(model_dir), options, entry)
    say(f"kiln: converted and built {model_dir} into {entry} (reused next time; set {CACHE_ENV} to move the cache)")
    return entry


def _convert_and_build(model_dir: Path, options: OneStepOptions, entry: Path) -> None:
    from kiln.build import build
    from kiln.checkpoint.convert import convert
    from kiln.checkpoint.kiln_format import load_artifact
    from kiln.checkpoint.output_guard import write_marker
    from kiln.cli.convert_cmd import plan_from_hf

    entry.parent.mkdir(parents=True, exist_ok=True)
    # The checkpoint is made beside the entry (same filesystem: the engine hard-links its weight files) and dropped.
    # Its folder carries kiln's temporary name and marker, so that the next one-step removes it if this process is
    # killed before it can (output_guard.clean_stale_temp_dirs, run by the build's atomic write).
    work = entry.parent / f".{entry.name}-checkpoint.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    write_marker(work)
    try:
        plan = plan_from_hf(str(model_dir), options.dtype, options.tp_size, options.pp_size)
        checkpoint = convert(plan, work / "checkpoint", progress=False)
        model = load_artifact(checkpoint, "checkpoint").model
        build(checkpoint, entry, _build_config(model, options))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_config(model, options: OneStepOptions):  # -> BuildConfig
    from kiln.config import BuildConfig

    max_seq_len = options.max_seq_len or model.max_position_embeddings
    default_input = max_seq_len - 1 if options.prompts_up_to_seq_len else min(BuildConfig.max_input_len, max_seq_len - 1)
    return BuildConfig(max_batch_size=options.max_batch_size, max_input_len=options.max_input_len or default_input,
                       max_seq_len=max_seq_len, max_num_tokens=options.max_num_tokens or BuildConfig.max_num_tokens,
                       kv_block_size=options.kv_block_size or BuildConfig.kv_block_size)
