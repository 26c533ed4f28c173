"""Checks of what a run is asked to do, made before any work: the device, the engine's files against its config, and
prompts and token ids against the model's vocabulary. Each failure is a ValueError whose message says what to do."""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch
from safetensors import safe_open

from kiln.config import ConfigError, dtype_name

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def runtime_device(name: str | None) -> torch.device:
    """The device to run on: `cpu`, `cuda` or `cuda:N` (default cuda when there is one); refuse anything else, and
    cuda where no GPU is visible, before the engine is loaded."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: kiln runs on cpu or cuda (cuda:N), not {device.type}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name}: no CUDA GPU is visible to this process; use --device cpu or check "
                              "CUDA_VISIBLE_DEVICES and the driver")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    return device


def check_rank_header(path: str, rank: int, dtype: torch.dtype, weight_only: bool = False,
                      act_order: bool = False) -> None:
    """A rank file must be the one written for this rank (convert records it) and hold the dtype the config states
    (and int8 quantized weights when the config says `weight_only`): a copy of another rank's file, or weights of
    another dtype, would load and give wrong answers."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    except Exception as err:  # safetensors raises several types for a damaged header
        raise ConfigError(f"cannot read {path}: {err}") from err
    recorded = metadata.get("kiln_rank")
    if recorded is not None and recorded != str(rank):
        raise ConfigError(f"{path} holds rank {recorded}'s weights, not rank {rank}'s; the engine's files were "
                          "copied or renamed: rebuild it from its checkpoint")
    stated = dtype_name(dtype)
    allowed = {stated, "I8", "F8_E4M3"} if weight_only else {stated}  # int8 / FP8 quantized weights
    if act_order:  # published act-order GPTQ: int32 group indices
        allowed.add("I32")
    found = sorted(_ST_DTYPES.get(d, d) for d in dtypes if _ST_DTYPES.get(d, d) not in allowed)
    if found:
        raise ConfigError(f"{path} holds {', '.join(found)} tensors, but the engine's config.json says {stated}; the "
                          "config or the file was changed: rebuild the engine from its checkpoint")


def check_prompt_ids(ids: Sequence[Any], vocab_size: int, which: str) -> None:
    """Every prompt token id must be an int inside the model's vocabulary (an id beyond it would index past the
    embedding table; a tokenizer larger than the model produces such ids)."""
    if len(ids) == 0:
        raise ValueError(f"{which} is empty; give at least one token")
    for position, token in enumerate(ids):
        if not isinstance(token, numbers.Integral) or isinstance(token, bool):
            raise ValueError(f"{which} holds {token!r} at position {position}; token ids are integers")
        if not 0 <= token < vocab_size:
            raise ValueError(f"{which} holds token id {token} at position {position}, outside the model's vocabulary "
                             f"of {vocab_size} (0..{vocab_size - 1}); is the tokenizer this model's?")


def check_param_ids(params: Any, vocab_size: int) -> None:
    """end_id, stop_token_ids and bad word ids must name tokens of the model: an id beyond the vocabulary can never
    be produced, so an end_id there would silently never stop the output."""
    named = [("end_id", [params.end_id] if params.end_id is not None else []),
             ("stop_token_ids", list(params.stop_token_ids)),
             ("logit_bias token", list(getattr(params, "logit_bias", None) or {}))] + [
                 ("bad_word_ids", list(w)) for w in params.bad_word_ids]
    for what, ids in named:
        for token in ids:
            if not 0 <= token < vocab_size:
                raise ValueError(f"{what} {token} is outside the model's vocabulary of {vocab_size} "
                                 f"(0..{vocab_size - 1}); use an id of this model's tokenizer")
