"""Test helpers: random weight-only quantized weights in kiln's per-channel format and in the group-wise format
(prompts' gw_format: unsigned values, scale and zero per (row, group), g(k) = (k + k_offset) // G), and their
dequantized values written out here independently of kiln's code (float64)."""

from __future__ import annotations

import torch

from kiln.quant.weight_only import pack_int4, quantize_per_channel


def per_channel(n: int, k: int, bits: int, gen: torch.Generator,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored int8 weight, scale [n], dense float64 [n, k] = q * scale)."""
    q, scale = quantize_per_channel(torch.randn(n, k, generator=gen), bits, dtype)
    return (pack_int4(q) if bits == 4 else q), scale, q.double() * scale.double()[:, None]


def pack_unsigned4(q: torch.Tensor) -> torch.Tensor:
    """q [..., k] in 0..15 -> [..., k / 2] int8, element 2i in the low nibble."""
    q = q.to(torch.int16)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)


def group_wise(n: int, k: int, bits: int, group: int, k_offset: int, gen: torch.Generator,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored int8 weight, scale [n, groups], zero [n, groups], dense float64 [n, k]) with random q, scales and
    integer zeros; groups = ceil((k + k_offset) / group)."""
    groups = -(-(k + k_offset) // group)
    top = 2**bits
    q = torch.randint(0, top, (n, k), generator=gen)
    scale = (torch.rand(n, groups, generator=gen) * 0.05 + 0.01).to(dtype)
    zero = torch.randint(0, top, (n, groups), generator=gen).to(dtype)
    g = (torch.arange(k) + k_offset) // group
    dense = (q.double() - zero.double()[:, g]) * scale.double()[:, g]
    stored = pack_unsigned4(q) if bits == 4 else q.to(torch.uint8).view(torch.int8)
    return stored, scale, zero, dense
