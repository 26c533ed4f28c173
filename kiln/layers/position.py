"""Position information: rotary embeddings (GPT-NeoX style) and ALiBi slopes."""

from __future__ import annotations

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE (rotate_half over the full head dimension), angles computed in float32."""

    def __init__(self, head_dim: int, max_positions: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.base = head_dim, max_positions, base
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the tables on the current default device: a model built on the meta device computes them
        again when it is placed on its device (kiln.layers.materialize)."""
        head_dim = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)  # [positions, head_dim/2]
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [tokens]; q [tokens, heads, head_dim]; k [tokens, kv_heads, head_dim]
        cos = self.cos[positions].unsqueeze(1)  # [tokens, 1, head_dim/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:  # [num_heads] float32
    """ALiBi slopes as MPT's gen_slopes defines them [LLMF attention.py]: for N = 2^ceil(log2 n) heads,
    s_i = 2^(-i * max / N), i = 1..N; when n is not a power of two, the odd-indexed slopes come first, then the
    even-indexed, truncated to n. With max = 8 this is bit-identical to Baichuan's and Press et al.'s interleaved
    slopes (model-facts.md §4), so one function serves both families."""
    padded = 2 ** math.ceil(math.log2(num_heads))
    m = torch.arange(1, padded + 1, dtype=torch.float32) * (alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2, m)
    if padded != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes
