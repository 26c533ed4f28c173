"""Weight-only per-channel round-to-nearest quantization: INT8 (W8A16) and INT4 (W4A16), symmetric, one scale per
output channel, as TensorRT-LLM's `--use_weight_only --weight_only_precision int8|int4`.

The recipe is TensorRT-LLM's `symmetric_quantize` (cutlass_preprocessors.cpp; ../shared/docs/quantization.md 1.3):
per output row, `scale = amax(|w|) / 2^(bits-1)` (/128 for INT8, /8 for INT4) and `q = clamp(round(w / scale),
-2^(bits-1), 2^(bits-1) - 1)`. The full negative range is used, so a row's largest positive weight is clipped by at
most one step. INT4 values are packed two per byte along the input dimension, low nibble first (TensorRT-LLM's
order, without its CUTLASS pre-shuffle: kiln's torch path reads the plain layout). Scales are stored in the
activation dtype, and q is computed from the scale as stored, so that `dequantize` gives back exactly the values the
rounding chose.

Plain torch only: the layers (kiln.quant.apply) and the torch kernel reference (kiln.kernels.reference) use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# TensorRT-LLM's quant_algo names -> bits per weight.
WEIGHT_ONLY_ALGOS = {"W8A16": 8, "W4A16": 4}


def quantize_per_channel(w: torch.Tensor, bits: int,
                         scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] float -> q [..., out, in] int8 (values in the `bits`-bit signed range, unpacked) and
    scale [..., out] in `scale_dtype`. An all-zero row gets scale 0 and q 0 (dequantizes to zeros exactly)."""
    qmax = 2 ** (bits - 1)
    wf = w.float()
    scale = (wf.abs().amax(dim=-1) / qmax).to(scale_dtype)  # [..., out]
    stored = scale.float().unsqueeze(-1)  # divide by the scale as stored, not by the unrounded one
    safe = torch.where(stored == 0, torch.ones_like(stored), stored)
    q = torch.clamp(torch.round(wf / safe), -qmax, qmax - 1).to(torch.int8)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., in] int8 in -8..7 -> [..., in / 2] int8: element 2i in the low nibble, 2i + 1 in the high one."""
    if q.shape[-1] % 2:
        raise ValueError(f"INT4 packs two values per byte along the last dimension; got {q.shape[-1]} (odd)")
    return pack_nibbles(q)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Each value's low 4 bits (two's complement nibbles for negative ones), two per byte along the last dimension:
    [..., in] -> [..., in / 2] int8, element 2i in the low nibble. Worked in uint8, so the working memory is two
    half-size tensors beside q: an int16 working copy of DBRX's w13 (2.1e9 values) would take 4.2 GB, twice."""
    if q.dtype in (torch.int8, torch.uint8):
        u = q.view(torch.uint8)
    else:
        u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    packed = u[..., 0::2] & 0xF  # [..., in / 2] uint8
    packed |= u[..., 1::2] << 4  # uint8 arithmetic drops the bits above the high nibble
    return packed.view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., in / 2] int8 -> q [..., in] int8 in -8..7 (the inverse of pack_int4)."""
    u = packed.view(torch.uint8).to(torch.int16)
    low, high = u & 0xF, u >> 4
    q = torch.stack([low, high], dim=-1).flatten(-2)  # [..., in]: low nibble first
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


def dequantize(stored: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Stored weight [..., out, in or in / 2] int8 and scale [..., out] -> w [..., out, in] in `dtype`:
    `q * scale`, computed in `dtype` (|q| <= 128 is exact in every float dtype)."""
    q = unpack_int4(stored) if bits == 4 else stored
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def per_expert(full: torch.Tensor, quantize_2d: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_2d` ([out, in] -> q int8 [out, in], scale [out]) over a full weight [..., out, in]: experts
    ([experts, out, in]) one at a time, so that the float32 working copies are one expert's (DBRX's full w13 is 2.1e9
    values)."""
    if full.dim() < 3:
        return quantize_2d(full)
    q = torch.empty(full.shape, dtype=torch.int8, device=full.device)
    scale = torch.empty(full.shape[:-1], dtype=scale_dtype, device=full.device)
    for e in range(full.shape[0]):
        q[e], scale[e] = quantize_2d(full[e])
    return q, scale


@dataclass(frozen=True)
class WeightOnlyMethod:
    """One weight-only format: how convert quantizes a full weight, what a layer stores, how it dequantizes."""

    quant_algo: str  # W8A16 or W4A16
    bits: int

    def quantize(self, full: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full weight [..., out, in] -> unpacked q [..., out, in] int8 and scale [..., out] (shard, then pack)."""
        return per_expert(full, lambda w: quantize_per_channel(w, self.bits, scale_dtype), scale_dtype)

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """One rank's unpacked q [..., out, in_local] -> what its file stores ([..., out, in_local / 2] for INT4)."""
        return pack_int4(q) if self.bits == 4 else q

    def stored_shape(self, logical: tuple[int, ...]) -> tuple[int, ...]:
        """The stored shape of a weight of logical shape [..., out, in]."""
        return (*logical[:-1], logical[-1] // 2) if self.bits == 4 else tuple(logical)

    def dequantize(self, stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(stored, scale, self.bits, dtype)


def weight_only_method(quant_algo: str | None) -> WeightOnlyMethod | None:
    """The method of a checkpoint's quant_algo (None: unquantized weights)."""
    if quant_algo is None:
        return None
    if quant_algo not in WEIGHT_ONLY_ALGOS:
        raise ValueError(f"quant_algo {quant_algo!r} is not a weight-only format kiln runs; known: "
                         f"{', '.join(WEIGHT_ONLY_ALGOS)}")
    return WeightOnlyMethod(quant_algo, WEIGHT_ONLY_ALGOS[quant_algo])
