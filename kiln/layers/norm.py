"""Normalisation layers. Both compute their statistics in float32 whatever the model dtype."""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.distributed.collectives import tp_all_reduce
from kiln.kernels import KernelSet, reference
from kiln.layers.sharding import Segment, set_shard


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (DBRX has none; MPT has one unless no_bias). MPT's low-precision LayerNorm
    is a plain LayerNorm outside autocast [LLMF norm.py], which is how kiln runs it."""

    def __init__(self, dim: int, eps: float, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, dim]
        return reference.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm as Baichuan computes it: variance in float32, the normalised value cast to the weight's dtype
    before the multiply [BC7 modeling_baichuan.py RMSNorm]."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, dim]
        return reference.rms_norm(x, self.weight, self.eps)


class FusedAddNorm(nn.Module):
    """A norm that a quantized format swapped in after loading, with its own fused add + norm (SmoothQuant's
    quantizing norm, kiln.kernels.triton_smoothquant): its output is what the next layer's bound matmul reads."""

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[object, torch.Tensor]:
        raise NotImplementedError


def add_and_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
                 kernels: KernelSet) -> tuple[torch.Tensor, torch.Tensor]:
    """`summed = x + residual` (x when residual is None) and `norm(summed)` through the engine's kernels: one
    Triton launch on the GPU instead of an add and a norm. Returns (normed, summed), both [tokens, dim]."""
    if isinstance(norm, FusedAddNorm):
        return norm.add_norm(x, residual)  # type: ignore[return-value]
    if isinstance(norm, RMSNorm):
        return kernels.add_norm(x, residual, norm.weight, None, norm.eps, True)
    if isinstance(norm, LayerNorm):
        return kernels.add_norm(x, residual, norm.weight, norm.bias, norm.eps, False)
    raise TypeError(f"add_and_norm takes a LayerNorm or RMSNorm, got {type(norm).__name__}")


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "rmsnorm":
        return RMSNorm(dim, config.norm_epsilon, config.torch_dtype)
    return LayerNorm(dim, config.norm_epsilon, config.norm_bias, config.torch_dtype)


class TPLayerNorm(nn.Module):
    """LayerNorm over a vector whose elements are spread over the tensor-parallel ranks (MPT's qk_ln normalises the
    whole query, d_model wide, and the whole key [LLMF attention.py], while each rank holds only its heads). Each
    rank keeps the weight and bias of its own elements; the statistics are summed over the ranks (see
    `tp_layer_norms`). Elements replicated on several ranks (KV heads when tp exceeds them) are replicated equally
    often, so sums over ranks count every element the same number of times and the mean is still exact."""

    def __init__(self, segment: Segment, tp_size: int, eps: float, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.count = tp_size * segment.local_size  # elements summed over the ranks, replicas included
        self.weight = set_shard(nn.Parameter(torch.empty(segment.local_size, dtype=dtype), requires_grad=False),
                                0, segment)
        self.bias = set_shard(nn.Parameter(torch.empty(segment.local_size, dtype=dtype), requires_grad=False),
                              0, segment) if bias else None


def tp_layer_norms(xs: list[torch.Tensor], norms: list[TPLayerNorm]) -> list[torch.Tensor]:
    """Apply each norm to its [tokens, local_dim] slice, in float32, with two-pass statistics (mean, then the
    centred square) and one all-reduce per pass for all the tensors together."""
    xf = [x.float() for x in xs]
    # Counts and eps stay Python scalars: a torch.tensor(..., device=cuda) here would synchronize the stream in
    # every layer (and cannot be captured in a CUDA graph).
    sums = tp_all_reduce(torch.stack([x.sum(-1) for x in xf], dim=-1))  # [tokens, len(xs)]
    centred = [x - sums[:, i : i + 1] / n.count for i, (x, n) in enumerate(zip(xf, norms))]
    squares = tp_all_reduce(torch.stack([(c * c).sum(-1) for c in centred], dim=-1))
    out = []
    for i, (x, c, norm) in enumerate(zip(xs, centred, norms)):
        rstd = torch.rsqrt(squares[:, i : i + 1] / norm.count + norm.eps)  # [tokens, 1]
        y = c * rstd * norm.weight.float()
        if norm.bias is not None:
            y = y + norm.bias.float()
        out.append(y.to(x.dtype))
    return out
