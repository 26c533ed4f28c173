"""build: a kiln checkpoint -> an engine directory (validated rank files, build limits, memory plan)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kiln.checkpoint.atomic import atomic_output_dir
from kiln.checkpoint.convert import meta_model
from kiln.checkpoint.kiln_format import ArtifactInfo, check_rank_file, load_artifact
from kiln.config import BuildConfig, ConfigError
from kiln.memory import GiB, MemoryPlan, activation_bytes, kv_bytes_per_token
from kiln.models.decoder import stage_layers


def plan_memory(info: ArtifactInfo, build: BuildConfig) -> MemoryPlan:
    """Check every rank file against the model and size the largest rank's needs."""
    weight_bytes, layers = 0, 0
    for rank in range(info.mapping.world_size):
        mapping = info.mapping.for_rank(rank)
        params = dict(meta_model(info.family, info.model, mapping).named_parameters())
        weight_bytes = max(weight_bytes, check_rank_file(info, rank, params))
        layers = max(layers, len(stage_layers(info.model.num_hidden_layers, mapping)))
    element = info.model.torch_dtype.itemsize
    return MemoryPlan(weight_bytes, kv_bytes_per_token(info.model, info.mapping, layers, element),
                      activation_bytes(info.model, build, element))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Engines share the checkpoint's bytes where the filesystem allows (DBRX is 264 GB)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build(checkpoint_dir: str | Path, output_dir: str | Path, build_config: BuildConfig,
          memory_gib: float | None = None) -> tuple[Path, MemoryPlan]:
    info = load_artifact(checkpoint_dir, "checkpoint")
    build_config.validate(info.model)
    plan = plan_memory(info, build_config)
    if memory_gib is not None and plan.weight_bytes + plan.activation_bytes > memory_gib * GiB:
        raise ConfigError(
            f"the model needs {plan.weight_bytes / GiB:.2f} GiB of weights and {plan.activation_bytes / GiB:.2f} GiB "
            f"of activations per rank, more than the {memory_gib:g} GiB given; use more ranks (--tp_size/--pp_size "
            "at convert) or smaller limits"
        )
    config = dict(info.raw, kind="engine", build=build_config.to_dict(), memory_plan=plan.to_dict())
    with atomic_output_dir(output_dir) as tmp:
        for rank in range(info.mapping.world_size):
            _link_or_copy(info.rank_file(rank), tmp / f"rank{rank}.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(output_dir), plan
