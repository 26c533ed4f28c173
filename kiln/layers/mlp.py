"""Dense feed-forward layers: MPT's GELU MLP and the SwiGLU MLP of Baichuan."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Mapping, ModelConfig
from kiln.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear


class GeluMLP(nn.Module):
    """`down(gelu_exact(up(x)))`, with biases unless the model has none."""

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        args = (config.linear_bias, config.torch_dtype, mapping.tp_size, mapping.tp_rank)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, *args)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden]
        return self.down_proj(F.gelu(self.up_proj(x)))


class GatedMLP(nn.Module):
    """`down(silu(gate(x)) * up(x))` with gate and up fused in one column-parallel weight [gate; up]."""

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        args = (config.linear_bias, config.torch_dtype, mapping.tp_size, mapping.tp_rank)
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], *args)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
