"""Handing a W8A8 linear layer its input already quantized: the norm before QKV and before a dense MLP's first
projection, and the MLP's activation before down_proj, swapped after loading for kernels that also quantize their
output in the same pass (SmoothQuant's INT8: kiln.kernels.triton_smoothquant; FP8: kiln.kernels.triton_fp8_fused).
The consuming layer's matmul accepts the `QuantizedActivation` instead of a float tensor and skips its own
quantization. Which layers take one is the format's binding's decision; where they sit in a block is decided here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from kiln.layers.linear import LinearBase
from kiln.layers.norm import FusedAddNorm, RMSNorm


class QuantizedActivation(NamedTuple):
    """An activation already quantized for the next linear layer: q [tokens, dim] (int8, or float8_e4m3fn), scale
    float32 [tokens, 1] (per token) or [1] (static), and the model dtype the layer's output takes."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


# kernel(x, residual, weight, bias, eps, rms, act_scale) -> (q, scale, summed)
AddNormQuantKernel = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class QuantizingNorm(FusedAddNorm):
    """The norm before a W8A8 layer, quantizing its output in the add + norm kernel. It holds the same weight and
    bias parameters under the same names, so the model's parameters are unchanged."""

    def __init__(self, norm: nn.Module, kernel: AddNormQuantKernel, act_scale: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, getattr(norm, "bias", None)
        self.eps, self.rms = norm.eps, isinstance(norm, RMSNorm)
        self.kernel = kernel
        # The layer's own static scale, referenced, not registered here a second time (None: per token).
        object.__setattr__(self, "act_scale", act_scale)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[QuantizedActivation, torch.Tensor]:
        # x, residual [tokens, dim] -> (the normed sum quantized, the sum [tokens, dim])
        q, scale, summed = self.kernel(x, residual, self.weight, self.bias, self.eps, self.rms, self.act_scale)
        return QuantizedActivation(q, scale, x.dtype), summed


class QuantizingActivation:
    """A dense MLP's activation bound to a kernel that also quantizes it: down_proj's input arrives quantized.
    kernel(x, *args): x [tokens, inter] (GELU) or [tokens, 2 * inter] ([gate; up]) -> (q [tokens, inter], scale)."""

    def __init__(self, kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]], *args: object) -> None:
        self.kernel, self.args = kernel, args

    def __call__(self, x: torch.Tensor) -> QuantizedActivation:
        q, scale = self.kernel(x, *self.args)
        return QuantizedActivation(q, scale, x.dtype)


def first_projection(block: nn.Module) -> LinearBase | None:
    """The dense MLP's first projection (None for a MoE: its router reads the float norm output, so that norm
    stays float)."""
    first = getattr(block.ffn, "gate_up_proj", None)
    return first if first is not None else getattr(block.ffn, "up_proj", None)


def normed_layers(block: nn.Module) -> list[tuple[str, LinearBase]]:
    """(the block's norm attribute, the one layer that reads its output): where a quantizing norm may stand."""
    pairs = [("input_norm", block.attn.qkv_proj), ("post_attn_norm", first_projection(block))]
    return [(name, layer) for name, layer in pairs if layer is not None]
