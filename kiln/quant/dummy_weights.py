"""Dummy weights drawn straight in a weight-only format (kiln bench's and `kiln convert --preset`'s quantized dummy
models): random stored values with scales (and zero points) of the magnitude rounding a normal(0, std) weight would
give, without a float copy of the weight, rounding or calibration. At real shapes (DBRX's experts: 16 x 21504 x 6144
per layer) quantizing random float weights costs minutes and gigabytes of fp32 copies, and calibrating them measures
nothing: a dummy engine exists to be timed, and only its formats' shapes, dtypes and value ranges matter.

Group-wise (kiln.quant.group_wise): q uniform in 0..2^bits-1, zero points integers around the middle of the range,
positive scales near the round-to-nearest scale of a normal(0, std) group (its range, about 5.4 std for a group of
128, over 2^bits - 1). Per channel (kiln.quant.weight_only): q uniform in the signed range, scales of the same
spread over the signed range."""

from __future__ import annotations

import torch

from kiln.quant.group_wise import GroupWiseMethod
from kiln.quant.weight_only import WeightOnlyMethod

# The range of a normal group of 128 values (about +-2.7 std), in stds: the scale of dummy weights is of the order a
# real rounding would give; its exact value does not change a timed engine.
_SPREAD_STDS = 5.4


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, device=device) * (high - low) + low).to(dtype)


def random_group_wise(method: GroupWiseMethod, shape: tuple[int, ...], dtype: torch.dtype, std: float,
                      gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A full weight [..., out, in] of the group-wise format: q [..., out, in] uint8 (unpacked, 0..2^bits-1), scale
    and zero [..., out, ceil(in / G)] in `dtype` (what convert's quantize returns; convert cuts and packs them)."""
    top = 2**method.bits
    groups = -(-shape[-1] // method.group_size)
    q = torch.randint(0, top, shape, generator=gen, device=device, dtype=torch.uint8)
    grouped = (*shape[:-1], groups)
    scale = _uniform(grouped, 0.75, 1.25, gen, device, torch.float32) * (std * _SPREAD_STDS / (top - 1))
    zero = torch.randint(top // 2 - 1, top // 2 + 2, grouped, generator=gen, device=device)
    return q, scale.to(dtype), zero.to(dtype)


def random_per_channel(method: WeightOnlyMethod, shape: tuple[int, ...], dtype: torch.dtype, std: float,
                       gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A full weight [..., out, in] of the per-channel format: q [..., out, in] int8 in -qmax..qmax, scale [..., out]
    in `dtype`."""
    qmax = 2 ** (method.bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, shape, generator=gen, device=device, dtype=torch.int8)
    scale = _uniform(tuple(shape[:-1]), 0.75, 1.25, gen, device, torch.float32) * (std * _SPREAD_STDS / (2 * qmax))
    return q, scale.to(dtype)


def draws_directly(method: object) -> bool:
    """Whether dummy weights of `method`'s format are drawn here (the integer weight-only formats); others (FP8) are
    rounded from dummy float weights, which costs no calibration."""
    return isinstance(method, (GroupWiseMethod, WeightOnlyMethod))


def random_quantized(method: GroupWiseMethod | WeightOnlyMethod, shape: tuple[int, ...], dtype: torch.dtype,
                     std: float, gen: torch.Generator,
                     device: torch.device) -> tuple[torch.Tensor, ...]:
    """What `method.quantize` would return for a normal(0, std) weight of `shape`, drawn directly."""
    if isinstance(method, GroupWiseMethod):
        return random_group_wise(method, shape, dtype, std, gen, device)
    return random_per_channel(method, shape, dtype, std, gen, device)
