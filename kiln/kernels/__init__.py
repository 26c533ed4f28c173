"""Kernels: Triton on CUDA, plain torch elsewhere. A `KernelSet` is chosen once, when an engine is loaded.

What `kiln build` decided about kernels for the GPU it saw lives in the engine's config.json under "kernels" (see
`kernels_section`): fused-MoE tiles, and per linear weight shape and decode row bucket whether the Triton GEMV beats
cuBLAS. `select_kernels`, given the engine's config, registers the MoE tiles (`apply_engine_kernel_choices`) and
carries the GEMV table in the KernelSet; `bind_linear_matmuls` hands it to the model's linear layers after loading.
So `run` never tunes."""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kiln.kernels import reference
from kiln.kernels.triton_moe_configs import config_from_dict, config_to_dict, default_moe_config
from kiln.kernels.triton_moe_configs import register_moe_config, token_buckets
from kiln.kernels.triton_gemv_configs import ROW_BUCKETS, GemvConfig, GemvKey, entry_to_dict, table_from_entries
from kiln.kernels import triton_weight_only_configs as wo_configs

KERNELS_FORMAT = 1

# Attention has no build-time choice to store: its launcher picks tiles from a table by phase and head size, and the
# split-K count from the context length of each step (or the engine's max_seq_len under CUDA graphs). Recorded so a
# reader of config.json knows nothing was tuned there.
ATTENTION_CHOICE = {"tuned": False, "choice": "tiles from the launcher's table by phase, head size, GQA group, batch and "
                                              "context bucket; split-K grid from the context bound, splits used per "
                                              "sequence on the device"}


@dataclass(frozen=True)
class KernelSet:
    """The implementations of kiln's hot operations that one engine uses (see reference.py for the contracts)."""

    name: str
    write_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    fused_moe: Callable[..., torch.Tensor]
    add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.add_norm
    # Weight-only per-channel INT8/INT4 experts (the triton set's: kiln.kernels.triton_moe_weight_only).
    fused_moe_weight_only: Callable[..., torch.Tensor] = reference.fused_moe_weight_only
    # Group-wise INT4 experts (W4A16_AWQ/GPTQ; the triton set's: kiln.kernels.triton_moe_group_wise).
    fused_moe_group_wise: Callable[..., torch.Tensor] = reference.fused_moe_group_wise
    # SmoothQuant W8A8 and FP8 experts (the triton set's: kiln.kernels.triton_moe_w8a8; FP8 only where the GPU has
    # FP8 tensor cores, else the torch reference).
    fused_moe_sq: Callable[..., torch.Tensor] = reference.fused_moe_sq
    fused_moe_fp8: Callable[..., torch.Tensor] = reference.fused_moe_fp8
    # {(row bucket, N, K): config} where the engine's build found the Triton GEMV faster than cuBLAS; empty: cuBLAS
    # everywhere (the torch set, an untuned engine, one tuned on another GPU).
    gemv: dict[GemvKey, GemvConfig] = field(default_factory=dict, hash=False, compare=False)
    # {(row bucket, N, K, bits, group): config} of the weight-only kernel tuned by the engine's build on this GPU;
    # empty: the default configs.
    weight_only: dict[wo_configs.WoKey, wo_configs.WoConfig] = field(default_factory=dict, hash=False, compare=False)


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
    gemv: dict[GemvKey, GemvConfig] = {}
    weight_only: dict[wo_configs.WoKey, wo_configs.WoConfig] = {}
    if engine_config is not None:
        apply_engine_kernel_choices(engine_config, device)
        gemv = engine_gemv_table(engine_config, device)
        weight_only = engine_weight_only_table(engine_config, device)
    from kiln.kernels.triton_ops import triton_kernels  # imported only when chosen: triton is optional on CPU

    return dataclasses.replace(triton_kernels(device=device), gemv=gemv, weight_only=weight_only)


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

        try:
            table = tune_moe_buckets(buckets, shape.hidden, shape.ffn, shape.experts, shape.top_k, dtype, device,
                                     budget_s, log)
        except Exception as err:  # noqa: BLE001 - tuning must never fail a build: the default tiles are correct
            warnings.warn(f"fused-MoE tuning failed ({type(err).__name__}: {err}); the engine keeps default tiles")
            tune = False
    if not (tune and device.type == "cuda"):
        table = {b: (default_moe_config(b, shape.top_k, shape.experts), False) for b in buckets}
    configs = [{"tokens": b, "tuned": tuned, **config_to_dict(config)} for b, (config, tuned) in table.items()]
    return {"hidden": shape.hidden, "ffn": shape.ffn, "experts": shape.experts, "top_k": shape.top_k,
            "dtype": str(dtype).replace("torch.", ""), "configs": configs}


# The GEMV's share of the build's tuning time (it runs first: every dense layer of a decode step uses it); the MoE
# tuning gets what is left of the whole budget.
LINEAR_BUDGET_S = 40.0


def _untuned_entries(shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """cuBLAS for every shape and row bucket, recorded as not tuned."""
    return [entry_to_dict(rows, n, k, None, False) for n, k in sorted(set(shapes)) for rows in ROW_BUCKETS]


def _linear_section(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device, tune: bool,
                    budget_s: float, log: Callable[[str], None] | None) -> dict[str, Any]:
    if tune and device.type == "cuda":
        from kiln.kernels.triton_gemv import tune_linear_shapes  # needs triton and a GPU

        try:
            entries = tune_linear_shapes(shapes, dtype, device, budget_s, log)
        except Exception as err:  # noqa: BLE001 - tuning must never fail a build: cuBLAS is always correct
            warnings.warn(f"decode-matmul tuning failed ({type(err).__name__}: {err}); the engine uses cuBLAS")
            entries = _untuned_entries(shapes)
    else:
        entries = _untuned_entries(shapes)
    return {"dtype": str(dtype).replace("torch.", ""), "entries": entries}


# Weight-only engines: the fused kernel's share (their quantized layers need no GEMV timing).
WEIGHT_ONLY_BUDGET_S = 45.0


def _weight_only_section(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, device: torch.device,
                         tune: bool, log: Callable[[str], None] | None) -> dict[str, Any]:
    entries = None
    if tune and device.type == "cuda":
        from kiln.kernels.triton_weight_only_tune import tune_weight_only_shapes  # needs triton and a GPU

        try:
            entries = tune_weight_only_shapes(shapes, dtype, device, WEIGHT_ONLY_BUDGET_S, log)
        except Exception as err:  # noqa: BLE001 - tuning must never fail a build: the default configs are correct
            warnings.warn(f"weight-only kernel tuning failed ({type(err).__name__}: {err}); the engine keeps the "
                          "default configs")
    if entries is None:
        entries = [wo_configs.entry_to_dict(rows, shape, None, False) for shape in sorted(set(shapes))
                   for rows in wo_configs.WO_ROW_BUCKETS]
    return {"dtype": str(dtype).replace("torch.", ""), "entries": entries}


def kernels_section(device: torch.device, moe: MoeShape | None, dtype: torch.dtype, max_num_tokens: int,
                    tune: bool = True, budget_s: float = 120.0, log: Callable[[str], None] | None = None,
                    linear_shapes: list[tuple[int, int]] | None = None,
                    weight_only_shapes: list[tuple[int, int, int, int]] | None = None) -> dict[str, Any]:
    """What `kiln build` stores under "kernels": the device it saw; for every distinct linear weight shape (N, K)
    in `linear_shapes` and decode row bucket (1, 2, 4, 8, 16), whether the Triton GEMV or cuBLAS is faster; and
    for an MoE model the fused-MoE tiles of every token bucket up to max_num_tokens. Tuned on that GPU when `tune`
    is set and the device is CUDA (within about `budget_s` seconds in all), else cuBLAS and the default tiles. For
    each weight-only quantized shape (N, K, bits, group) in `weight_only_shapes`, the fused kernel's fastest config
    per row bucket (its own WEIGHT_ONLY_BUDGET_S)."""
    start = time.perf_counter()
    wo_part = None if not weight_only_shapes else \
        _weight_only_section(weight_only_shapes, dtype, device, tune, log)
    linear_part = None if linear_shapes is None else \
        _linear_section(linear_shapes, dtype, device, tune, min(LINEAR_BUDGET_S, budget_s), log)
    moe_budget = max(0.0, budget_s - (time.perf_counter() - start))
    moe_part = None if moe is None else _moe_section(moe, dtype, device, max_num_tokens, tune, moe_budget, log)
    tuned = (moe_part is not None and any(c["tuned"] for c in moe_part["configs"])) or \
        (linear_part is not None and any(e["tuned"] for e in linear_part["entries"])) or \
        (wo_part is not None and any(e["tuned"] for e in wo_part["entries"]))
    return {"format": KERNELS_FORMAT, "device": device_name(device), "tuned": tuned,
            "tune_seconds": round(time.perf_counter() - start, 1), "fused_moe": moe_part, "linear": linear_part,
            "weight_only": wo_part, "attention": dict(ATTENTION_CHOICE)}


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


def _usable_section(engine_config: dict[str, Any], device: torch.device) -> tuple[dict[str, Any] | None, str]:
    """The engine's "kernels" section if it holds choices tuned on this device's GPU, else None; and a line saying
    which. A section of another format is a ValueError; one tuned on another GPU warns once."""
    section = engine_config.get("kernels")
    if section is None:
        return None, "kernels: defaults (the engine records no kernel choices)"
    found = section.get("format") if isinstance(section, dict) else section
    if found != KERNELS_FORMAT:
        raise ValueError(f"the engine's \"kernels\" section has format {found!r}, this kiln reads format "
                         f"{KERNELS_FORMAT}; rebuild the engine with this kiln (kiln build)")
    built_on, here = section.get("device"), device_name(device)
    if not section.get("tuned"):
        return None, f"kernels: defaults (nothing was tuned at build on {built_on})"
    if built_on != here:
        _warn_once((str(built_on), here),
                   f"this engine's kernel tiles were tuned on {built_on}, but this is {here}: using the default "
                   "tiles and cuBLAS; rebuild the engine on this GPU (kiln build) to tune for it")
        return None, f"kernels: defaults (tuned on {built_on}, not on this {here})"
    return section, ""


def apply_engine_kernel_choices(engine_config: dict[str, Any], device: torch.device) -> str:
    """Register the fused-MoE tiles an engine's build tuned, if they were tuned on this device's GPU; otherwise the
    defaults stay (with a warning, once, when the engine was tuned on another GPU). Returns one line saying which.
    An engine built before kernel choices were recorded has no "kernels" section: defaults, silently. (The GEMV
    choices travel in the KernelSet instead: engine_gemv_table.)"""
    section, line = _usable_section(engine_config, device)
    if section is None:
        return line
    moe = section.get("fused_moe")
    entries = [] if moe is None else _tuned_entries(moe)
    for key, config in entries:
        register_moe_config(key, config)
    gemv = engine_gemv_table(engine_config, device)
    weight_only = engine_weight_only_table(engine_config, device)
    quant = f", {len(weight_only)} weight-only kernel configs" if weight_only else ""
    return (f"kernels: {len(entries)} tuned fused-MoE tile configs, {len(gemv)} Triton GEMV choices{quant} from the "
            f"build on {device_name(device)}")


def engine_gemv_table(engine_config: dict[str, Any], device: torch.device) -> dict[GemvKey, GemvConfig]:
    """{(row bucket, N, K): config} where the engine's build, on this device's GPU, found the Triton GEMV faster
    than cuBLAS; empty for an untuned engine, one tuned elsewhere, or one built before GEMV choices existed."""
    section, _ = _usable_section(engine_config, device)
    linear = None if section is None else section.get("linear")
    if linear is None:
        return {}
    try:
        return table_from_entries(linear.get("entries") if isinstance(linear, dict) else linear)
    except ValueError as err:
        raise ValueError(f"the engine's kernels.linear section is malformed ({err}); rebuild the engine "
                         "(kiln build)") from None


def engine_weight_only_table(engine_config: dict[str, Any],
                             device: torch.device) -> dict[wo_configs.WoKey, wo_configs.WoConfig]:
    """The weight-only kernel configs the engine's build tuned on this device's GPU (empty: the defaults)."""
    section, _ = _usable_section(engine_config, device)
    part = None if section is None else section.get("weight_only")
    if part is None:
        return {}
    try:
        return wo_configs.table_from_entries(part.get("entries") if isinstance(part, dict) else part)
    except ValueError as err:
        raise ValueError(f"the engine's kernels.weight_only section is malformed ({err}); rebuild the engine "
                         "(kiln build)") from None


def bind_linear_matmuls(model: torch.nn.Module, kernels: KernelSet, device: torch.device) -> int:
    """After loading: give each weight-only quantized linear layer the Triton weight-only matmul
    (kiln.kernels.triton_weight_only, bound from the attributes of the layer's torch matmul: bits, scale, zero,
    group_size, k_offset), and each float linear layer whose weight shape has a Triton GEMV choice in `kernels.gemv`
    its per-layer matmul (kiln.kernels.triton_gemv.GemvMatmul); W8A8 layers (SmoothQuant, FP8) get the norms and
    MLP activations before them swapped for kernels that also quantize their output. CUDA with the triton set
    only: CPU and torch-backend engines keep the torch matmuls everywhere. Returns how many layers were bound."""
    if device.type != "cuda" or kernels.name != "triton":
        return 0
    from kiln.kernels.triton_weight_only import bind_weight_only  # needs triton

    bound = bind_weight_only(model, kernels.weight_only)
    from kiln.kernels.triton_smoothquant import bind_smoothquant  # SmoothQuant W8A8 layers and their norms

    bound += bind_smoothquant(model)
    from kiln.kernels.triton_fp8_fused import bind_fp8_fused  # FP8 W8A8: its quantization in the norms, activations

    bind_fp8_fused(model)  # no layer rebound (the FP8 matmuls stay), so not counted
    if kernels.gemv:
        from kiln.kernels.triton_gemv import bind_gemv

        bound += bind_gemv(model, kernels.gemv)
    return bound
