"""Dense feed-forward layers: MPT's GELU MLP and the SwiGLU MLP of Baichuan."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Mapping, ModelConfig
from kiln.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [tokens, 2 * inter] rows [gate; up] -> [tokens, inter]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class GeluMLP(nn.Module):
    """`down(gelu_exact(up(x)))`, with biases unless the model has none."""

    # up's output -> down's input: torch's exact GELU, unless a quantized format bound a fused kernel that also
    # quantizes down's input (kiln.kernels.triton_smoothquant); chosen once at load, not per call.
    activation = staticmethod(F.gelu)

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        args = (config.linear_bias, config.torch_dtype, mapping.tp_size, mapping.tp_rank)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, *args)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden]
        return self.down_proj(self.activation(self.up_proj(x)))


class GatedMLP(nn.Module):
    """`down(silu(gate(x)) * up(x))` with gate and up fused in one column-parallel weight [gate; up]."""

    activation = staticmethod(silu_and_mul)  # bound like GeluMLP.activation

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        args = (config.linear_bias, config.torch_dtype, mapping.tp_size, mapping.tp_rank)
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], *args)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden]
        return self.down_proj(self.activation(self.gate_up_proj(x)))
