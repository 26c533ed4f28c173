"""Executors: what the engine loop hands a scheduled step to. One rank: the ModelRunner itself; several ranks: a
driver that runs rank 0's share and drives the other ranks' workers."""

from __future__ import annotations


import torch

from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.config import ConfigError
from kiln.executor.model_runner import CacheConfig, ModelRunner


def create_executor(info: ArtifactInfo, device: torch.device, cache: CacheConfig, kernel_backend: str = "auto"):
    """The executor for an engine: it offers `num_blocks`, `execute(output)`, `compute_logits(output, all_logits)`,
    `release(seq_id)` and `shutdown()`.

    A multi-rank engine started by hand spawns its other ranks here. Under torchrun or mpirun (their environment
    names this process's rank), rank 0 returns the driver and every other rank serves the driver's steps right
    here and then exits the process: 0 when the driver shut down, 1 when something failed."""
    from kiln.distributed.launch import launcher_env, launcher_store
    from kiln.kernels import select_kernels

    world = info.mapping.world_size
    env = launcher_env()
    if env is not None and env.world_size != world:
        raise ConfigError(f"{info.path} is a {world}-rank engine but the launcher started {env.world_size} "
                          f"processes; start it with {world} (e.g. torchrun --nproc_per_node {world})")
    if world == 1:
        return ModelRunner(info, info.mapping, device, cache, select_kernels(device, kernel_backend, info.raw))
    from kiln.executor.multirank import MultiRankDriver

    if env is None:
        return MultiRankDriver(info, device, cache, kernel_backend)
    store = launcher_store(env)
    if env.rank == 0:
        return MultiRankDriver(info, device, cache, kernel_backend, store=store, local_rank=env.local_rank)
    from kiln.executor.worker import exit_rank, run_rank

    exit_rank(run_rank(info, info.mapping.for_rank(env.rank), device, env.local_rank, store, cache, kernel_backend))
