"""Executors: what the engine loop hands a scheduled step to. One rank: the ModelRunner itself; several ranks: a
driver that runs rank 0's share and drives the other ranks' workers."""

from __future__ import annotations

import torch

from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.config import ConfigError
from kiln.executor.model_runner import CacheConfig, ModelRunner


def create_executor(info: ArtifactInfo, device: torch.device, cache: CacheConfig, kernel_backend: str = "auto"):
    """The executor for an engine: it offers `num_blocks`, `execute(output)`, `compute_logits(output, all_logits)`,
    `release(seq_id)` and `shutdown()`."""
    from kiln.kernels import select_kernels

    if info.mapping.world_size > 1:
        raise ConfigError(f"{info.path} has {info.mapping.world_size} ranks; this kiln runs one-rank engines only: "
                          "convert with --tp_size 1 --pp_size 1")
    return ModelRunner(info, info.mapping, device, cache, select_kernels(device, kernel_backend))
