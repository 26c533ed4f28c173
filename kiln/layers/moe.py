"""The one mixture-of-experts layer for every MoE model: a router, then GLU experts run by the fused-MoE kernel.

Experts are split two ways inside the tensor-parallel group (moe_ep_size × moe_tp_size = tp_size): expert parallel
places whole experts on ranks, tensor parallel splits every expert's ffn dimension. Each (expert, ffn slice) lives on
exactly one rank of the group, so one all-reduce over the group adds up the full result either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kiln.config import Mapping, ModelConfig
from kiln.distributed.collectives import tp_all_reduce
from kiln.layers.context import ForwardContext
from kiln.layers.linear import ReplicatedLinear
from kiln.layers.sharding import set_shard, split_evenly

if TYPE_CHECKING:
    from kiln.kernels import KernelSet


class MoE(nn.Module):
    """Top-k routing with softmax in float32 (DBRX's remote code), optional p-norm renormalisation of the chosen
    weights, and experts stored as w13 [experts, 2 * ffn, hidden] (rows: gate then up) and w2 [experts, hidden, ffn]."""

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        dtype, hidden, ffn = config.torch_dtype, config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = config.moe_num_experts, config.moe_top_k
        self.normalize_p = config.moe_normalize_p
        self.router = ReplicatedLinear(hidden, self.num_experts, False, dtype)
        experts = split_evenly(self.num_experts, mapping.moe_ep_size, mapping.moe_ep_rank, "experts")
        ffn_part = split_evenly(ffn, mapping.moe_tp_size, mapping.moe_tp_rank, "expert ffn size")
        self.expert_start = experts.index * experts.local_size
        local_e, local_f = experts.local_size, ffn_part.local_size
        self.w13 = nn.Parameter(torch.empty(local_e, 2 * local_f, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local_e, hidden, local_f, dtype=dtype), requires_grad=False)
        set_shard(self.w13, 0, experts)
        set_shard(self.w13, 1, ffn_part, ffn_part)
        set_shard(self.w2, 0, experts)
        set_shard(self.w2, 2, ffn_part)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [tokens, hidden] -> weights [tokens, top_k] float32, expert ids [tokens, top_k]
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_p is not None:
            weights = weights / torch.linalg.vector_norm(weights, ord=self.normalize_p, dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [tokens, hidden]
        weights, ids = self.route(x)
        return tp_all_reduce(self.run_experts(ctx.kernels, x, weights, ids))

    def run_experts(self, kernels: KernelSet, x: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:  # x [tokens, hidden] -> [tokens, hidden] (this rank's part)
        """The experts in the engine dtype; a weight-only quantized model binds its own (kiln.quant.apply)."""
        return kernels.fused_moe(x, self.w13, self.w2, weights, ids, self.expert_start)
