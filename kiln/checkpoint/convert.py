"""convert: a Hugging Face checkpoint (or dummy weights) -> kiln checkpoint (config.json + rank{r}.safetensors).

Each full tensor is read once, transformed, then cut into every rank's shard and appended to that rank's file, so
memory holds a few tensors at a time whatever the model size, and no rank file needs another rank's bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from kiln.checkpoint.atomic import atomic_output_dir
from kiln.checkpoint.output_guard import check_output_dir
from kiln.checkpoint.safety import check_fits
from kiln.checkpoint.safetensors_writer import StreamingSafetensorsWriter
from kiln.checkpoint.tokenizer_files import copy_tokenizer_files
from kiln.config import FORMAT_VERSION, Mapping, ModelConfig, QuantConfig
from kiln.layers.sharding import full_shape, shard_for
from kiln.models.family import Family
from kiln.quant.apply import quantize_model
from kiln.quant.fp8_calibration import with_fp8_input_scales
from kiln.quant.kv_calibration import with_kv_scales


class WeightSource(Protocol):
    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor: ...


@dataclass
class ConvertPlan:
    """Everything convert needs once the inputs are resolved."""

    family: Family
    config: ModelConfig
    mapping: Mapping
    source: WeightSource
    quant: QuantConfig
    provenance: dict[str, Any]
    kv_calibration: Any = None  # kiln.quant.kv_calibration.KVCalibration for an INT8/FP8 KV cache (None: defaults)


def meta_model(family: Family, config: ModelConfig, mapping: Mapping,
               quant: QuantConfig | None = None) -> torch.nn.Module:
    """The model of one rank without storage: its parameter names, local shapes and shard specs (quantized ones
    when `quant` says so)."""
    with torch.device("meta"):
        model = family.model_class(config, mapping)
    quantize_model(model, quant)
    return model


def rank_parameters(plan: ConvertPlan) -> list[dict[str, torch.nn.Parameter]]:
    return [dict(meta_model(plan.family, plan.config, plan.mapping.for_rank(r), plan.quant).named_parameters())
            for r in range(plan.mapping.world_size)]


def stored_dtype(param: torch.nn.Parameter, dtype: torch.dtype) -> torch.dtype:
    """What a rank file stores for `param`: int8 / FP8 quantized weights as they are, every float in the engine dtype."""
    return param.dtype if param.dtype in (torch.int8, torch.float8_e4m3fn) else dtype


def _quantize_full(param: torch.nn.Parameter, full: torch.Tensor, dtype: torch.dtype,
                   scales: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A weight-only quantized parameter's full unpacked int8 values; its full scale waits in `scales` for its own
    turn in the write order (after the layer's bias)."""
    q, scale = param.weight_only.quantize(full, dtype)  # q [..., out, in] int8, scale [..., out]
    scales[name + "_scale"] = scale
    return q


def checkpoint_config(plan: ConvertPlan) -> dict[str, Any]:
    return {
        "kiln_format_version": FORMAT_VERSION,
        "kind": "checkpoint",
        **plan.config.to_dict(),
        "mapping": plan.mapping.to_dict(),
        "quantization": dataclasses.asdict(plan.quant),
        "provenance": plan.provenance,
    }


def _write_tensors(plan: ConvertPlan, ranks: list[dict[str, torch.nn.Parameter]], order: list[str],
                   writers: list[StreamingSafetensorsWriter], progress: bool) -> None:
    """Read each full tensor once, in the global order, and append every rank's shard of it to that rank's file."""
    dtype = plan.config.torch_dtype
    scales: dict[str, torch.Tensor] = {}
    for name in tqdm(order, desc="convert", unit="tensor", disable=not progress):
        holders = [r for r, params in enumerate(ranks) if name in params]
        if not holders:
            continue
        first = ranks[holders[0]][name]
        if getattr(first, "is_weight_scale", False):
            full = scales.pop(name)
        else:
            full = plan.source.full_tensor(name, full_shape(first)).to(dtype)
            if hasattr(first, "weight_only"):  # quantize the full weight once; each rank packs its own shard
                full = _quantize_full(first, full, dtype, scales, name)
        for r in holders:
            shard = shard_for(ranks[r][name], full)
            if hasattr(first, "weight_only"):
                shard = first.weight_only.pack(shard)
            writers[r].write(name, shard.contiguous())
        del full


def convert(plan: ConvertPlan, output_dir: str | Path, progress: bool = True) -> Path:
    """Write the kiln checkpoint of `plan` to `output_dir` atomically and return its path."""
    inputs = tuple(Path(plan.provenance[k]) for k in ("model_dir", "config") if plan.provenance.get(k))
    check_output_dir(Path(output_dir), inputs)  # before the size estimate: a refused path is the clearer message
    check_fits(plan.family, plan.config, Path(output_dir), dummy=bool(plan.provenance.get("dummy")))
    plan = with_kv_scales(plan, progress)  # an INT8/FP8 KV cache: calibrate its scales first
    plan = with_fp8_input_scales(plan, progress)  # static FP8 activations: calibrate their scales too
    ranks = rank_parameters(plan)
    full_model = meta_model(plan.family, plan.config, Mapping(), plan.quant)  # the global parameter order
    order = [name for name, _ in full_model.named_parameters()]
    dtype = plan.config.torch_dtype
    with atomic_output_dir(output_dir, inputs) as tmp:
        writers: list[StreamingSafetensorsWriter] = []
        try:
            for r, params in enumerate(ranks):
                writers.append(StreamingSafetensorsWriter(tmp / f"rank{r}.safetensors",
                                                          [(n, stored_dtype(p, dtype), tuple(p.shape))
                                                           for n, p in params.items()],
                                                          {"format": "pt", "kiln_rank": str(r)}))
            _write_tensors(plan, ranks, order, writers, progress)
        except BaseException:
            for writer in writers:  # an open file would keep the removed file's disk space until collected
                with contextlib.suppress(OSError):
                    writer.file.close()
            raise
        for writer in writers:
            writer.close()
            # Engines hard-link these files (kiln build): read-only, so an edit of one cannot silently change both.
            os.chmod(writer.path, 0o444)
        if plan.provenance.get("model_dir"):  # dummy weights have no tokenizer
            copy_tokenizer_files(Path(plan.provenance["model_dir"]), tmp)
        (tmp / "config.json").write_text(json.dumps(checkpoint_config(plan), indent=2) + "\n")
    return Path(output_dir)
