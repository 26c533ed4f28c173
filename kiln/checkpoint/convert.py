"""convert: a Hugging Face checkpoint (or dummy weights) -> kiln checkpoint (config.json + rank{r}.safetensors).

Each full tensor is read once, transformed, then cut into every rank's shard and appended to that rank's file, so
memory holds a few tensors at a time whatever the model size, and no rank file needs another rank's bytes."""

from __future__ import annotations

import contextlib
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
from kiln.config import FORMAT_VERSION, Mapping, ModelConfig, QuantConfig
from kiln.layers.sharding import full_shape, shard_for
from kiln.models.family import Family


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


def meta_model(family: Family, config: ModelConfig, mapping: Mapping) -> torch.nn.Module:
    """The model of one rank without storage: its parameter names, local shapes and shard specs."""
    with torch.device("meta"):
        return family.model_class(config, mapping)


def rank_parameters(plan: ConvertPlan) -> list[dict[str, torch.nn.Parameter]]:
    return [dict(meta_model(plan.family, plan.config, plan.mapping.for_rank(r)).named_parameters())
            for r in range(plan.mapping.world_size)]


def checkpoint_config(plan: ConvertPlan) -> dict[str, Any]:
    return {
        "kiln_format_version": FORMAT_VERSION,
        "kind": "checkpoint",
        **plan.config.to_dict(),
        "mapping": plan.mapping.to_dict(),
        "quantization": vars(plan.quant),
        "provenance": plan.provenance,
    }


def _write_tensors(plan: ConvertPlan, ranks: list[dict[str, torch.nn.Parameter]], order: list[str],
                   writers: list[StreamingSafetensorsWriter], progress: bool) -> None:
    """Read each full tensor once, in the global order, and append every rank's shard of it to that rank's file."""
    dtype = plan.config.torch_dtype
    for name in tqdm(order, desc="convert", unit="tensor", disable=not progress):
        holders = [r for r, params in enumerate(ranks) if name in params]
        if not holders:
            continue
        full = plan.source.full_tensor(name, full_shape(ranks[holders[0]][name])).to(dtype)
        for r in holders:
            writers[r].write(name, shard_for(ranks[r][name], full).contiguous())
        del full


def convert(plan: ConvertPlan, output_dir: str | Path, progress: bool = True) -> Path:
    """Write the kiln checkpoint of `plan` to `output_dir` atomically and return its path."""
    inputs = tuple(Path(plan.provenance[k]) for k in ("model_dir", "config") if plan.provenance.get(k))
    check_output_dir(Path(output_dir), inputs)  # before the size estimate: a refused path is the clearer message
    check_fits(plan.family, plan.config, Path(output_dir), dummy=bool(plan.provenance.get("dummy")))
    ranks = rank_parameters(plan)
    full_model = meta_model(plan.family, plan.config, Mapping())  # the global parameter order
    order = [name for name, _ in full_model.named_parameters()]
    dtype = plan.config.torch_dtype
    with atomic_output_dir(output_dir, inputs) as tmp:
        writers: list[StreamingSafetensorsWriter] = []
        try:
            for r, params in enumerate(ranks):
                writers.append(StreamingSafetensorsWriter(tmp / f"rank{r}.safetensors",
                                                          [(n, dtype, tuple(p.shape)) for n, p in params.items()],
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
        (tmp / "config.json").write_text(json.dumps(checkpoint_config(plan), indent=2) + "\n")
    return Path(output_dir)
