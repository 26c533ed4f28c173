"""Normalisation layers. Both compute their statistics in float32 whatever the model dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (DBRX has none; MPT has one unless no_bias). MPT's low-precision LayerNorm
    is a plain LayerNorm outside autocast [LLMF norm.py], which is how kiln runs it."""

    def __init__(self, dim: int, eps: float, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, dim]
        bias = None if self.bias is None else self.bias.float()
        y = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), bias, self.eps)
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as Baichuan computes it: variance in float32, the normalised value cast to the weight's dtype
    before the multiply [BC7 modeling_baichuan.py RMSNorm]."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, dim]
        xf = x.float()
        variance = xf.pow(2).mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "rmsnorm":
        return RMSNorm(dim, config.norm_epsilon, config.torch_dtype)
    return LayerNorm(dim, config.norm_epsilon, config.norm_bias, config.torch_dtype)
