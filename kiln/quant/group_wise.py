"""Group-wise weight-only INT4 (W4A16_AWQ, W4A16_GPTQ): asymmetric, one scale and one zero point per group of
`group_size` consecutive input features of each output row (the format agreed with the kernels, docs/quantization.md).

Storage of a weight `w [..., out, in]` (one rank's slice):
- `<name>` int8: two UNSIGNED 4-bit values q in 0..15 per byte along the input dim, element 2i in the low nibble
  (8-bit: q in 0..255 as uint8 bits viewed as int8);
- `<name>_scale`, `<name>_zero` [..., out, groups] in the activation dtype (zero points integer-valued);
- `w[..., o, k] = (q[..., o, k] - zero[..., o, g(k)]) * scale[..., o, g(k)]`, `g(k) = (k + k_offset) // G`, where
  k_offset is where this rank's input slice starts inside its first group (a tensor-parallel split of the input dim
  that cuts a group). A rank whose slice starts mid-group stores one group column more than ceil(in_local / G).

The round-to-nearest recipe (also what AWQ ends with, on its scaled and clipped weights) follows AutoGPTQ's
quantizer: per group, the range [min(w_min, 0), max(w_max, 0)] (zero always representable, an all-zero group stays
exactly zero), `scale = range / (2^bits - 1)`, `zero = round(-min / scale)`, `q = clamp(round(w / scale) + zero, 0,
2^bits - 1)`. Scales are stored in the activation dtype and q is computed from the scale as stored.

Plain torch only: the layers (kiln.quant.apply), the torch references (kiln.kernels.reference) and calibration use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.quant.weight_only import pack_nibbles

# quant_algo -> bits per weight (the group size is the checkpoint's quantization.group_size).
GROUP_WISE_ALGOS = {"W4A16_AWQ": 4, "W4A16_GPTQ": 4, "W8A16_GPTQ": 8}  # W8A16_GPTQ: published 8-bit GPTQ
GROUP_SIZES = (32, 64, 128)


def num_groups(in_local: int, group_size: int, k_offset: int) -> int:
    """Group columns a rank stores for `in_local` input features starting `k_offset` into its first group."""
    return -(-in_local // group_size) + (1 if k_offset else 0)


def group_params(wmin: torch.Tensor, wmax: torch.Tensor, bits: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max (any shape) -> (scale, zero) in `dtype`: the range always holds 0."""
    qmax = 2**bits - 1
    lo, hi = wmin.float().clamp(max=0), wmax.float().clamp(min=0)
    scale = ((hi - lo) / qmax).to(dtype)
    stored = scale.float()
    safe = torch.where(stored == 0, torch.ones_like(stored), stored)
    zero = torch.clamp(torch.round(-lo / safe), 0, qmax).to(dtype)
    return scale, zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w [...] float with its group's scale and zero broadcast to it -> q [...] int16 in 0..2^bits - 1."""
    stored = scale.float()
    safe = torch.where(stored == 0, torch.ones_like(stored), stored)
    q = torch.round(w.float() / safe) + zero.float()
    return torch.where(stored == 0, zero.float(), q).clamp(0, 2**bits - 1).to(torch.int16)


def quantize_groups(w: torch.Tensor, group_size: int, bits: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest: w [..., out, in] float -> q [..., out, in] int16 (0..2^bits-1, unpacked), scale and zero
    [..., out, ceil(in / G)] in `dtype`. A last group shorter than G uses the features it has."""
    groups = -(-w.shape[-1] // group_size)
    pad = groups * group_size - w.shape[-1]
    wf = w.float()
    # Pad the last group with copies of its first element: they change neither its min nor its max.
    padded = torch.cat([wf, wf[..., -group_size + pad: -group_size + pad + 1].expand(*wf.shape[:-1], pad)], -1) \
        if pad else wf
    grouped = padded.unflatten(-1, (groups, group_size))  # [..., out, groups, G]
    scale, zero = group_params(grouped.amin(-1), grouped.amax(-1), bits, dtype)
    q = quantize_values(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).flatten(-2)
    return q[..., : w.shape[-1]], scale, zero


def pack_uint4(q: torch.Tensor) -> torch.Tensor:
    """q [..., in] in 0..15 -> [..., in / 2] int8: element 2i in the low nibble, 2i + 1 in the high one."""
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit weights pack two per byte along the input features; got {q.shape[-1]} (odd)")
    return pack_nibbles(q)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """[..., in / 2] int8 -> q [..., in] int16 in 0..15 (the inverse of pack_uint4)."""
    u = packed.view(torch.uint8).to(torch.int16)
    return torch.stack([u & 0xF, u >> 4], dim=-1).flatten(-2)


def pack_values(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpacked q [..., in] (0..2^bits-1) -> stored int8 bytes ([..., in / 2] for 4 bits, [..., in] for 8)."""
    return pack_uint4(q) if bits == 4 else q.to(torch.uint8).view(torch.int8)


def unpack_values(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored int8 bytes -> q [..., in] int16 in 0..2^bits - 1."""
    return unpack_uint4(stored) if bits == 4 else stored.view(torch.uint8).to(torch.int16)


def group_index(in_local: int, group_size: int, k_offset: int, g_idx: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """g(k) for k in 0..in_local-1: g_idx when act-order keeps one, else (k + k_offset) // G.  # [in_local] int64"""
    if g_idx is not None:
        return g_idx.long()
    return (torch.arange(in_local, device=device) + k_offset) // group_size


def dequantize_groups(stored: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                      dtype: torch.dtype, k_offset: int = 0, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The reference every group-wise kernel is held to: stored [..., out, in (/2)] int8, scale/zero [..., out,
    groups] -> w [..., out, in] in `dtype`, `((q - zero).to(dtype)) * scale` (q - zero is an exact small integer)."""
    q = unpack_values(stored, bits)
    g = group_index(q.shape[-1], group_size, k_offset, g_idx, q.device)
    zero_k = zero.index_select(-1, g).to(torch.int16)  # [..., out, in]
    return (q - zero_k).to(dtype) * scale.index_select(-1, g).to(dtype)


@dataclass(frozen=True)
class GroupWiseMethod:
    """One group-wise format: how convert quantizes a full weight (round to nearest, when no calibration gave the
    values), what a layer stores and how it dequantizes."""

    quant_algo: str  # W4A16_AWQ or W4A16_GPTQ
    bits: int
    group_size: int

    def quantize(self, full: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full weight [..., out, in] -> q [..., out, in] int16, scale and zero [..., out, groups]. Experts are done
        one at a time so that float32 working copies stay one expert's."""
        if full.dim() < 3:
            return quantize_groups(full, self.group_size, self.bits, dtype)
        parts = [quantize_groups(full[e], self.group_size, self.bits, dtype) for e in range(full.shape[0])]
        return tuple(torch.stack(p) for p in zip(*parts))  # type: ignore[return-value]

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        return pack_values(q, self.bits)

    def stored_shape(self, logical: tuple[int, ...]) -> tuple[int, ...]:
        return (*logical[:-1], logical[-1] // 2) if self.bits == 4 else tuple(logical)


def group_wise_method(quant_algo: str | None, group_size: int) -> GroupWiseMethod | None:
    """The method of a checkpoint's quant_algo, or None when it is not a group-wise one."""
    if quant_algo not in GROUP_WISE_ALGOS:
        return None
    return GroupWiseMethod(quant_algo, GROUP_WISE_ALGOS[quant_algo], group_size)


def slice_groups(full: torch.Tensor, start: int, in_local: int, group_size: int) -> torch.Tensor:
    """A rank's group columns of a full scale or zero [..., out, groups] for its input slice [start, start +
    in_local), padded with zeros to num_groups(...) columns (the pad is never read: g(k) stays below it)."""
    first, k_offset = divmod(start, group_size)
    used = (k_offset + in_local - 1) // group_size + 1
    part = full.narrow(-1, first, used)
    want = num_groups(in_local, group_size, k_offset)
    if want > used:
        part = torch.cat([part, part.new_zeros(*part.shape[:-1], want - used)], dim=-1)
    return part
