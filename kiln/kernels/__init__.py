"""Kernels: Triton on CUDA, plain torch elsewhere. A `KernelSet` is chosen once, when an engine is loaded.

What `kiln build` decided about kernels for the GPU it saw lives in the engine's config.json under "kernels" (see
`kernels_section`); `apply_engine_kernel_choices` (called by `select_kernels` when it is given the engine's config)
registers it when the engine is loaded, so `run` never tunes."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kiln.kernels import reference
from kiln.kernels.triton_moe_configs import config_from_dict, config_to_dict, default_moe_config
from kiln.kernels.triton_moe_configs import register_moe_config, token_buckets

KERNELS_FORMAT = 1

# Attention has no build-time choice to store: its launcher picks tiles from a table by phase and head size, and the
# split-K count from the context length of each step (or the engine's max_seq_len under CUDA graphs). Recorded so a
# reader of config.json knows nothing was tuned there.
ATTENTION_CHOICE = {"tuned": False, "choice": "tiles by phase and head size from the launcher's table; split-K count "
                                              "from the context length at run time"}


@dataclass(frozen=True)
class KernelSet:
    """The implementations of kiln's hot operations that one engine uses (see reference.py for the contracts)."""

    name: str
    write_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    fused_moe: Callable[..., torch.Tensor]
    add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.add_norm


REFERENCE = KernelSet(
    name="torch",
    write_kv_cache=reference.write_kv_cache,
    paged_attention=reference.paged_attention,
    fused_moe=reference.fused_moe,
    add_norm=reference.add_norm,
)


def select_kernels(device: torch.device, backend: str = "auto",
                   engine_config: dict[str, Any] | None = None) -> KernelSet:
    """Pick the kernels for `device`: "triton" on CUDA when asked or by default, "torch" everywhere else. With the
    engine's config.json (`ArtifactInfo.raw`), the tile configs its build tuned for this GPU are registered too."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}; choose auto, torch or triton")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return REFERENCE
    if engine_config is not None:
        apply_engine_kernel_choices(engine_config, device)
    from kiln.kernels.triton_ops import triton_kernels  # imported only when chosen: triton is optional on CPU

    return triton_kernels()


def device_name(device: torch.device) -> str:
    """The name tuned configs are recorded under: the GPU's marketing name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass(frozen=True)
class MoeShape:
    """One rank's fused-MoE shape: hidden size, its slice of the expert ffn, its local experts, and top-k."""

    hidden: int
    ffn: int
    experts: int
    top_k: int


def _moe_section(shape: MoeShape, dtype: torch.dtype, device: torch.device, max_num_tokens: int, tune: bool,
                 budget_s: float, log: Callable[[str], None] | None) -> dict[str, Any]:
    buckets = token_buckets(max_num_tokens)
    if tune and device.type == "cuda":
        from kiln.kernels.triton_moe import tune_moe_buckets  # needs triton and a GPU

        table = tune_moe_buckets(buckets, shape.hidden, shape.ffn, shape.experts, shape.top_k, dtype, device,
                                 budget_s, log)
    else:
        table = {b: (default_moe_config(b, shape.top_k, shape.experts), False) for b in buckets}
    configs = [{"tokens": b, "tuned": tuned, **config_to_dict(config)} for b, (config, tuned) in table.items()]
    return {"hidden": shape.hidden, "ffn": shape.ffn, "experts": shape.experts, "top_k": shape.top_k,
            "dtype": str(dtype).replace("torch.", ""), "configs": configs}


def kernels_section(device: torch.device, moe: MoeShape | None, dtype: torch.dtype, max_num_tokens: int,
                    tune: bool = True, budget_s: float = 120.0,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What `kiln build` stores under "kernels": the device it saw, and for an MoE model the fused-MoE tiles of
    every token bucket up to max_num_tokens, tuned on that GPU when `tune` is set and the device is CUDA (within
    about `budget_s` seconds), else the defaults."""
    start = time.perf_counter()
    moe_part = None if moe is None else _moe_section(moe, dtype, device, max_num_tokens, tune, budget_s, log)
    tuned = moe_part is not None and any(c["tuned"] for c in moe_part["configs"])
    return {"format": KERNELS_FORMAT, "device": device_name(device), "tuned": tuned,
            "tune_seconds": round(time.perf_counter() - start, 1), "fused_moe": moe_part,
            "attention": dict(ATTENTION_CHOICE)}


_WARNED: set[tuple[str, str]] = set()


def _warn_once(key: tuple[str, str], message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _tuned_entries(moe: dict[str, Any]) -> list[tuple[tuple[int, int, int, int], Any]]:
    """(table key, MoeConfig) of every tuned entry of a "fused_moe" section; a malformed one is a ValueError."""
    try:
        shape = (int(moe["hidden"]), int(moe["ffn"]), int(moe["experts"]))
        return [((int(e["tokens"]), *shape), config_from_dict(e, f"kernels.fused_moe config for {e['tokens']} tokens"))
                for e in moe["configs"] if e.get("tuned")]
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"the engine's kernels.fused_moe section is malformed ({err!r}); rebuild the engine "
                         "(kiln build)") from None


def apply_engine_kernel_choices(engine_config: dict[str, Any], device: torch.device) -> str:
    """Register the fused-MoE tiles an engine's build tuned, if they were tuned on this device's GPU; otherwise the
    defaults stay (with a warning, once, when the engine was tuned on another GPU). Returns one line saying which.
    An engine built before kernel choices were recorded has no "kernels" section: defaults, silently."""
    section = engine_config.get("kernels")
    if section is None:
        return "kernels: defaults (the engine records no kernel choices)"
    found = section.get("format") if isinstance(section, dict) else section
    if found != KERNELS_FORMAT:
        raise ValueError(f"the engine's \"kernels\" section has format {found!r}, this kiln reads format "
                         f"{KERNELS_FORMAT}; rebuild the engine with this kiln (kiln build)")
    built_on, here = section.get("device"), device_name(device)
    moe = section.get("fused_moe")
    if not section.get("tuned") or moe is None:
        return f"kernels: defaults (nothing was tuned at build on {built_on})"
    if built_on != here:
        _warn_once((str(built_on), here),
                   f"this engine's kernel tiles were tuned on {built_on}, but this is {here}: using the default "
                   "tiles; rebuild the engine on this GPU (kiln build) to tune for it")
        return f"kernels: defaults (tuned on {built_on}, not on this {here})"
    entries = _tuned_entries(moe)
    for key, config in entries:
        register_moe_config(key, config)
    return f"kernels: {len(entries)} tuned fused-MoE tile configs from the build on {here}"
