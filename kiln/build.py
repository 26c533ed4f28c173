"""build: a kiln checkpoint -> an engine directory (validated rank files, build limits, kernel choices tuned for the
GPU it runs on, memory plan)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from kiln.checkpoint.atomic import atomic_output_dir
from kiln.checkpoint.output_guard import check_output_dir
from kiln.checkpoint.convert import meta_model
from kiln.checkpoint.kiln_format import ArtifactInfo, check_rank_file, load_artifact
from kiln.checkpoint.tokenizer_files import copy_tokenizer_files
from kiln.config import BuildConfig, ConfigError
from kiln.kernels import MoeShape, kernels_section
from kiln.layers.embedding import LMHead
from kiln.layers.linear import LinearBase
from kiln.memory import GiB, MemoryPlan, activation_bytes, kv_bytes_per_token
from kiln.models.decoder import stage_layers
from kiln.quant.kv_cache import kv_element_size


def check_memory_gib(memory_gib: float | None) -> None:
    """--memory_gib must be a positive finite number (NaN would compare false with everything and pass every check)."""
    if memory_gib is not None and not (math.isfinite(memory_gib) and memory_gib > 0):
        raise ConfigError(f"--memory_gib must be a positive number of GiB, got {memory_gib}")


def plan_memory(info: ArtifactInfo, build: BuildConfig) -> MemoryPlan:
    """Check every rank file against the model and size the largest rank's needs."""
    weight_bytes, quantized, layers = 0, 0, 0
    for rank in range(info.mapping.world_size):
        mapping = info.mapping.for_rank(rank)
        params = dict(meta_model(info.family, info.model, mapping, info.quant).named_parameters())
        # Weights drawn in memory have no file to check: the rank holds exactly its parameters.
        rank_bytes = check_rank_file(info, rank, params) if info.weights_in_memory is None else \
            sum(p.numel() * p.element_size() for p in params.values())
        if rank_bytes > weight_bytes:
            weight_bytes, quantized = rank_bytes, quantized_bytes(params)
        layers = max(layers, len(stage_layers(info.model.num_hidden_layers, mapping)))
    element = info.model.torch_dtype.itemsize
    kv_element = kv_element_size(info.quant, info.model.torch_dtype)  # 1 for an INT8/FP8 cache
    return MemoryPlan(weight_bytes, kv_bytes_per_token(info.model, info.mapping, layers, kv_element),
                      activation_bytes(info.model, build, element), quantized)


def quantized_bytes(params: dict[str, torch.nn.Parameter]) -> int:
    """Bytes of a rank's quantized weights and their scales and zero points."""
    return sum(p.numel() * p.element_size() for p in params.values()
               if hasattr(p, "weight_only") or getattr(p, "is_weight_scale", False))


def moe_shape(info: ArtifactInfo) -> MoeShape | None:
    """The fused-MoE shape of one rank (every rank's is the same: experts and ffn split evenly), or None for a dense
    model."""
    if not info.model.is_moe:
        return None
    params = meta_model(info.family, info.model, info.mapping.for_rank(0)).named_parameters()
    w13 = next(p for name, p in params if name.endswith(".w13"))  # [local experts, 2 * local ffn, hidden]
    return MoeShape(hidden=w13.shape[2], ffn=w13.shape[1] // 2, experts=w13.shape[0], top_k=info.model.moe_top_k)
    # (the unquantized model's shapes: a weight-only engine's experts run the torch reference, nothing is tuned)


def linear_shapes(info: ArtifactInfo) -> list[tuple[int, int]]:
    """The distinct (out, in) weight shapes of the linear layers the ranks run (attention, dense MLP, router, LM
    head; not the weight-only quantized ones), as each rank holds them: what the build times the GEMV on. Sorted, each
    once."""
    shapes: set[tuple[int, int]] = set()
    for rank in range(info.mapping.world_size):
        model = meta_model(info.family, info.model, info.mapping.for_rank(rank), info.quant)
        for module in model.modules():
            # Weight-only quantized layers run their own kernels (kiln.kernels.triton_weight_only): nothing to time.
            if isinstance(module, (LinearBase, LMHead)) and module.weight.dtype != torch.int8:
                shapes.add((int(module.weight.shape[0]), int(module.weight.shape[1])))
    return sorted(shapes)


def weight_only_shapes(info: ArtifactInfo) -> list[tuple[int, int, int, int]]:
    """The distinct (out, in, bits, group size) of the weight-only quantized linear layers the ranks run, as each
    rank holds them: what the build tunes the fused weight-only kernel on."""
    if info.quant.quant_algo is None:
        return []
    shapes: set[tuple[int, int, int, int]] = set()
    for rank in range(info.mapping.world_size):
        model = meta_model(info.family, info.model, info.mapping.for_rank(rank), info.quant)
        for module in model.modules():
            matmul, weight = getattr(module, "matmul", None), getattr(module, "weight", None)
            bits = getattr(matmul, "bits", None)
            if bits in (4, 8) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                logical = getattr(weight, "logical_shape", weight.shape)
                shapes.add((int(logical[0]), int(logical[1]), int(bits), int(getattr(matmul, "group_size", 0) or 0)))
    return sorted(shapes)


def choose_kernels(info: ArtifactInfo, build_config: BuildConfig, tune: bool = True,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The engine's "kernels" section: on a GPU (unless `tune` is off) the winner of cuBLAS and the Triton GEMV for
    each linear weight shape and decode row bucket, and the fused-MoE tiles tuned for this rank's expert shape over
    every token bucket up to max_num_tokens; else cuBLAS and the default tiles. Tuned for the GPU this build runs
    on; `run` on another GPU falls back to the defaults."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = moe_shape(info)
    linear = linear_shapes(info)
    if log is not None and tune and device.type == "cuda":
        log(f"timing the Triton GEMV against cuBLAS on {torch.cuda.get_device_name(device)} for {len(linear)} "
            "linear weight shapes at 1, 2, 4, 8 and 16 rows")
        if shape is not None:
            log(f"tuning fused MoE tiles for {shape.experts} experts x ffn {shape.ffn} x hidden {shape.hidden}, "
                f"token buckets up to {build_config.max_num_tokens}")
    quantized = weight_only_shapes(info)
    if log is not None and tune and device.type == "cuda" and quantized:
        log(f"tuning the weight-only kernel for {len(quantized)} quantized weight shapes at 1..64 rows")
    return kernels_section(device, shape, info.model.torch_dtype, build_config.max_num_tokens, tune, log=log,
                           linear_shapes=linear, weight_only_shapes=quantized)


def _link_or_copy(src: Path, dst: Path, copy: bool = False) -> None:
    """Engines share the checkpoint's bytes where the filesystem allows (DBRX is 264 GB), unless `copy`. The shared
    file is made read-only: an edit through either name would change both the checkpoint and the engine."""
    if not copy:
        try:
            os.link(src, dst)
            os.chmod(dst, 0o444)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o444)


def build(checkpoint_dir: str | Path, output_dir: str | Path, build_config: BuildConfig,
          memory_gib: float | None = None, tune: bool = True,
          log: Callable[[str], None] | None = None, copy_weights: bool = False) -> tuple[Path, MemoryPlan]:
    """Validate the checkpoint against the limits, plan memory, choose (and on a GPU tune) kernels, and write the
    engine atomically. `tune=False` records the default kernel tiles without timing anything; `copy_weights` copies
    the rank files instead of hard-linking them."""
    inputs = (Path(checkpoint_dir),)
    check_output_dir(Path(output_dir), inputs)  # before minutes of tuning, not after
    info = load_artifact(checkpoint_dir, "checkpoint")
    check_memory_gib(memory_gib)
    build_config.validate(info.model)
    plan = plan_memory(info, build_config)
    if memory_gib is not None and plan.weight_bytes + plan.activation_bytes > memory_gib * GiB:
        raise ConfigError(
            f"the model needs {plan.weight_bytes / GiB:.2f} GiB of weights and {plan.activation_bytes / GiB:.2f} GiB "
            f"of activations per rank, more than the {memory_gib:g} GiB given; use more ranks (--tp_size/--pp_size "
            "at convert) or smaller limits"
        )
    kernels = choose_kernels(info, build_config, tune, log)
    config = dict(info.raw, kind="engine", build=build_config.to_dict(), memory_plan=plan.to_dict(), kernels=kernels)
    with atomic_output_dir(output_dir, inputs) as tmp:
        for rank in range(info.mapping.world_size if info.weights_in_memory is None else 0):
            _link_or_copy(info.rank_file(rank), tmp / f"rank{rank}.safetensors", copy_weights)
        copy_tokenizer_files(Path(checkpoint_dir), tmp)  # the engine carries the checkpoint's tokenizer
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(output_dir), plan
