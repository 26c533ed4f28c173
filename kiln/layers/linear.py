"""Linear layers that know how they are split over tensor-parallel ranks.

Weights are stored as [out_features, in_features] (torch's layout). Column-parallel layers split the output
features, row-parallel layers split the input features and sum the partial results over the ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.distributed.collectives import tp_all_reduce
from kiln.layers.sharding import Segment, set_shard, split_evenly


class LinearBase(nn.Module):
    """A bias-optional linear map over local shapes; subclasses attach the shard specs."""

    # How the layer multiplies: F.linear, unless loading a CUDA engine bound a per-layer Triton GEMV for the decode
    # row counts where its build measured that faster (kiln.kernels.bind_linear_matmuls); chosen once, not per call.
    matmul = staticmethod(F.linear)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        return self.matmul(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank (routers, small heads)."""


class ColumnParallelLinear(LinearBase):
    """Output features split evenly over `tp_size` ranks; each rank produces its slice."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        seg = split_evenly(out_features, tp_size, tp_rank, "output features")
        super().__init__(in_features, seg.local_size, bias, dtype)
        set_shard(self.weight, 0, seg)
        if self.bias is not None:
            set_shard(self.bias, 0, seg)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel outputs fused in one weight (e.g. [gate; up]); each part is split on its own so that a
    rank's shard holds its slice of every part."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, dtype: torch.dtype,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        segs = [split_evenly(size, tp_size, tp_rank, "fused output part") for size in part_sizes]
        super().__init__(in_features, sum(s.local_size for s in segs), bias, dtype)
        set_shard(self.weight, 0, *segs)
        if self.bias is not None:
            set_shard(self.bias, 0, *segs)


class QKVParallelLinear(LinearBase):
    """Fused [Q; K; V] projection split by heads. When tp exceeds the KV head count, KV heads are replicated:
    rank r keeps KV head r * kv_heads // tp_size."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool, dtype: torch.dtype,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        q_seg = split_evenly(heads * head_dim, tp_size, tp_rank, "attention heads")
        if heads % tp_size:
            raise ValueError(f"{heads} attention heads cannot be split over tp_size {tp_size}; choose a divisor")
        kv_seg = kv_segment(kv_heads, head_dim, tp_size, tp_rank)
        self.local_heads = heads // tp_size
        self.local_kv_heads = kv_seg.local_size // head_dim
        super().__init__(hidden, q_seg.local_size + 2 * kv_seg.local_size, bias, dtype)
        set_shard(self.weight, 0, q_seg, kv_seg, kv_seg)
        if self.bias is not None:
            set_shard(self.bias, 0, q_seg, kv_seg, kv_seg)


def kv_segment(kv_heads: int, head_dim: int, tp_size: int, tp_rank: int) -> Segment:
    """This rank's KV heads: split when tp divides them, one replicated head per rank group when tp exceeds them."""
    if tp_size <= kv_heads:
        return split_evenly(kv_heads * head_dim, tp_size, tp_rank, "key/value heads")
    if tp_size % kv_heads:
        raise ValueError(f"tp_size {tp_size} must be a multiple of the {kv_heads} key/value heads to replicate them")
    return Segment(kv_heads * head_dim, kv_heads, tp_rank * kv_heads // tp_size)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial products are summed with an all-reduce. The bias is added once,
    after the reduction."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        seg = split_evenly(in_features, tp_size, tp_rank, "input features")
        super().__init__(seg.local_size, out_features, bias, dtype)
        set_shard(self.weight, 1, seg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, in_local] -> [tokens, out]
        y = tp_all_reduce(self.matmul(x, self.weight, None))
        return y if self.bias is None else y + self.bias
