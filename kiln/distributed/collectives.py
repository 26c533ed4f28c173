"""Collectives over the tensor-parallel group. With one rank every call is a no-op, so layers call them always."""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_TP_SIZE = 1


def set_tp_group(group: dist.ProcessGroup | None, size: int) -> None:
    """Called once by the worker after it joins the world."""
    global _TP_GROUP, _TP_SIZE
    _TP_GROUP, _TP_SIZE = group, size


def tp_size() -> int:
    """How many tensor-parallel ranks this process's group has (1 outside a multi-rank engine)."""
    return _TP_SIZE


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel ranks (in place where possible)."""
    if _TP_SIZE == 1:
        return x
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `x` along the last dimension, in rank order."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=-1)


def tp_all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """The elementwise max of `x` over the tensor-parallel ranks (in place where possible)."""
    if _TP_SIZE == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_TP_GROUP)
    return x
