"""How a parameter's full tensor is cut into one rank's shard.

Layers own their sharding: each parameter carries a `ShardSpec` saying which dimension is split and how each
logical segment along it (q, k and v of a fused QKV; gate and up of a fused GLU) is divided among ranks. convert
applies it to the full tensor read from Hugging Face; the model never slices weights itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Segment:
    """A run of `size` rows along the split dimension, cut into `pieces` equal pieces of which this rank keeps
    piece `index` (pieces = 1: replicated)."""

    size: int
    pieces: int = 1
    index: int = 0

    @property
    def local_size(self) -> int:
        return self.size // self.pieces


@dataclass(frozen=True)
class ShardSpec:
    """The split of one parameter along one dimension: its segments in order. `pad` allows a full tensor shorter than
    the segments (a vocabulary padded to a multiple of tp): the missing rows are zeros."""

    dim: int
    segments: tuple[Segment, ...]
    pad: bool = False

    @property
    def local_size(self) -> int:
        return sum(s.local_size for s in self.segments)

    def full_size(self) -> int:
        return sum(s.size for s in self.segments)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of `full`, which must have `full_size()` rows along `dim`."""
        if self.pad and full.shape[self.dim] < self.full_size():
            pad_shape = list(full.shape)
            pad_shape[self.dim] = self.full_size() - full.shape[self.dim]
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=self.dim)
        if full.shape[self.dim] != self.full_size():
            raise ValueError(
                f"cannot shard a tensor of shape {tuple(full.shape)}: dimension {self.dim} should be {self.full_size()}"
            )
        parts, start = [], 0
        for seg in self.segments:
            begin = start + seg.index * seg.local_size
            parts.append(full.narrow(self.dim, begin, seg.local_size))
            start += seg.size
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def split_evenly(size: int, pieces: int, index: int, what: str) -> Segment:
    """A segment split `pieces` ways; refuses sizes that do not divide, naming what was being split."""
    if size % pieces:
        raise ValueError(f"{what} ({size}) cannot be split evenly over {pieces} ranks; choose a tp size that divides it")
    return Segment(size, pieces, index)


def set_shard(param: nn.Parameter, dim: int, *segments: Segment, pad: bool = False) -> nn.Parameter:
    """Attach a split of `dim` to a parameter; a parameter split along two dimensions (experts and their ffn
    dimension) gets two calls."""
    specs = getattr(param, "shard_specs", ())
    param.shard_specs = specs + (ShardSpec(dim, tuple(segments), pad),)  # type: ignore[attr-defined]
    return param


def full_shape(param: nn.Parameter) -> tuple[int, ...]:
    """The shape of the unsharded tensor this parameter is cut from. A quantized weight whose stored shape differs
    from the weight it quantizes (INT4 packs two values per byte) carries that weight's local `logical_shape`."""
    shape = list(getattr(param, "logical_shape", param.shape))
    for spec in getattr(param, "shard_specs", ()):
        shape[spec.dim] = spec.full_size()
    return tuple(shape)


def shard_for(param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """Cut `full` to this parameter's shard (unchanged for a replicated parameter)."""
    for spec in getattr(param, "shard_specs", ()):
        full = spec.shard(full)
    return full
