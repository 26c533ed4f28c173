"""The pre-norm decoder every supported family is made of; families differ only by config switches.

    h = x + attn(norm_1(x));  y = h + ffn(norm_2(h));  logits = lm_head(norm_f(h_last))

Each residual add is done by the kernel of the norm that follows it (KernelSet.add_norm): a block hands the next one
its ffn output and the residual stream separately, and the stage adds them once at its end.

A pipeline stage builds only its own layers (named by their global index, so checkpoint names do not depend on the
split); the first stage owns the embedding and the last the final norm and LM head.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ConfigError, Mapping, ModelConfig
from kiln.layers.attention import Attention
from kiln.layers.context import ForwardContext
from kiln.layers.embedding import LMHead, VocabEmbedding
from kiln.layers.mlp import GatedMLP, GeluMLP
from kiln.layers.moe import MoE
from kiln.layers.norm import add_and_norm, make_norm


def stage_layers(num_layers: int, mapping: Mapping) -> range:
    """Contiguous layers of this rank's pipeline stage; earlier stages take the remainder one by one."""
    if num_layers < mapping.pp_size:
        raise ConfigError(f"{num_layers} layers cannot be split into {mapping.pp_size} pipeline stages")
    base, extra = divmod(num_layers, mapping.pp_size)
    start = mapping.pp_rank * base + min(mapping.pp_rank, extra)
    return range(start, start + base + (1 if mapping.pp_rank < extra else 0))


class DecoderBlock(nn.Module):
    """One transformer block; the feed-forward part is a MoE, a SwiGLU MLP or a GELU MLP as the config says."""

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        self.input_norm = make_norm(config)
        self.attn = Attention(config, mapping)
        self.post_attn_norm = make_norm(config)
        self.is_moe = config.is_moe
        if config.is_moe:
            self.ffn: nn.Module = MoE(config, mapping)
        elif config.hidden_act == "silu":
            self.ffn = GatedMLP(config, mapping)
        else:
            self.ffn = GeluMLP(config, mapping)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden [tokens, hidden_size]: the previous block's branch output, added to `residual` here (the first
        # block gets residual None: hidden is the stream itself). Each residual add rides in the norm's kernel.
        # -> (this block's ffn output, the residual stream before it); their sum is the block's output.
        normed, residual = add_and_norm(self.input_norm, hidden, residual, ctx.kernels)
        attn_out = self.attn(positions, normed, ctx)
        normed, residual = add_and_norm(self.post_attn_norm, attn_out, residual, ctx.kernels)
        return (self.ffn(normed, ctx) if self.is_moe else self.ffn(normed)), residual


class DecoderForCausalLM(nn.Module):
    """Embedding, this stage's blocks, final norm and LM head. Family classes subclass it for their name only."""

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        self.config, self.mapping = config, mapping
        self.layer_ids = stage_layers(config.num_hidden_layers, mapping)
        self.is_first_stage = mapping.pp_rank == 0
        self.is_last_stage = mapping.pp_rank == mapping.pp_size - 1
        if self.is_first_stage:
            self.embed_tokens = VocabEmbedding(config, mapping)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(config, mapping) for i in self.layer_ids})
        if self.is_last_stage:
            self.norm = make_norm(config)
            self.lm_head = LMHead(config, mapping)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, positions [tokens]; hidden [tokens, hidden_size] from the previous stage, if any
        if self.is_first_stage:
            hidden = self.embed_tokens(input_ids)
        residual = None
        for block in self.layers.values():
            hidden, residual = block(positions, hidden, residual, ctx)
        return hidden if residual is None else hidden + residual  # [tokens, hidden_size]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [rows, hidden] -> [rows, vocab] float32
        return self.lm_head(self.norm(hidden))

    def attention_layers(self) -> list[Attention]:
        return [block.attn for block in self.layers.values()]
