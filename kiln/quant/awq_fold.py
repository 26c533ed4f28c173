"""AWQ over one decoder block: which linears share an input, what produced that input, and the folding of the
chosen scales into the producer (kiln.quant.awq has the searches and the reasons)."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from kiln.layers.attention import Attention
from kiln.layers.mlp import GatedMLP
from kiln.layers.moe import MoE
from kiln.models.decoder import DecoderBlock
from kiln.quant.awq import search_clip, search_scale
from kiln.quant.capture import BlockCapture
from kiln.quant.group_wise import GroupWiseMethod


def scale_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """norm(x) / s: LayerNorm's weight and bias, RMSNorm's weight."""
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)


def scale_rows(weight: torch.Tensor, bias: torch.Tensor | None, start: int, s: torch.Tensor) -> None:
    """Divide output rows start .. start + len(s) (and their bias) by s: that linear's output / s."""
    weight[start: start + s.shape[0]].div_(s.unsqueeze(1))
    if bias is not None:
        bias[start: start + s.shape[0]].div_(s)


T = TypeVar("T")


def with_weight(param: torch.Tensor, value: torch.Tensor, run: Callable[[], T]) -> T:
    """run() with `param` holding `value` for the time of the call."""
    saved = param.data
    param.data = value.to(saved.dtype)
    try:
        return run()
    finally:
        param.data = saved


def v_scalable(attn: Attention) -> bool:
    """V feeds the output projection channel for channel only without GQA, and V / s clips as V does only unclipped."""
    return attn.num_kv_heads == attn.num_heads and attn.clip_qkv is None


class AwqFolder:
    """Search, fold and clip one block's linears from what BlockCapture recorded of their inputs."""

    def __init__(self, capture: BlockCapture, method: GroupWiseMethod, grid: int, clipping: bool = True,
                 attention: Callable[[Attention, torch.Tensor], torch.Tensor | None] | None = None) -> None:
        # attention(attn, x): the attention's output on recorded windows x (LayerwiseModel.attention)
        self.capture, self.method, self.grid, self.clipping = capture, method, grid, clipping
        self.attention = attention

    def inputs(self, name: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample rows [t, in], mean |x| [in]) of a weight's recorded inputs."""
        stats = self.capture.stat(name)
        return stats.rows(width), stats.mean_abs(width)

    def search(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], mean: torch.Tensor,
               inspect: Callable[[list[torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
        return search_scale(pairs, mean, self.method.group_size, self.method.bits, self.grid, inspect)

    def attention_output(self, attn: Attention, x: torch.Tensor) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
        """QKV weight -> the attention's output on the sample windows x (None when x is not whole windows)."""
        if self.attention is None or self.attention(attn, x) is None:  # (one run: cheap beside the search's)
            return None

        def inspect(weights: list[torch.Tensor]) -> torch.Tensor:
            return with_weight(attn.qkv_proj.weight, weights[0], lambda: self.attention(attn, x))
        return inspect

    def clip(self, weight: torch.Tensor, x: torch.Tensor) -> None:
        if self.clipping:
            weight.copy_(search_clip(weight, x, self.method.group_size, self.method.bits, self.grid))

    @torch.no_grad()
    def fold_block(self, block: DecoderBlock) -> None:
        attn = block.attn
        qkv = attn.qkv_proj
        x, mean = self.inputs("attn.qkv_proj.weight", qkv.weight.shape[1])
        s = self.search([(qkv.weight, x)], mean, self.attention_output(attn, x))
        scale_norm(block.input_norm, s)
        qkv.weight.mul_(s)  # no clipping: Q and K errors reach the attention scores
        o = attn.o_proj
        x, mean = self.inputs("attn.o_proj.weight", o.weight.shape[1])
        if v_scalable(attn):
            s = self.search([(o.weight, x)], mean)
            v_start = (attn.num_heads + attn.num_kv_heads) * attn.head_dim
            scale_rows(qkv.weight, qkv.bias, v_start, s)
            o.weight.mul_(s)
            x = x / s
        self.clip(o.weight, x)
        if isinstance(block.ffn, MoE):
            self.fold_moe(block.ffn, block.post_attn_norm)
        else:
            self.fold_mlp(block.ffn, block.post_attn_norm)

    def fold_mlp(self, mlp: nn.Module, norm: nn.Module) -> None:
        gated = isinstance(mlp, GatedMLP)
        first = mlp.gate_up_proj if gated else mlp.up_proj
        name = "ffn.gate_up_proj.weight" if gated else "ffn.up_proj.weight"
        x, mean = self.inputs(name, first.weight.shape[1])
        s = self.search([(first.weight, x)], mean, lambda ws: with_weight(first.weight, ws[0], lambda: mlp(x)))
        scale_norm(norm, s)
        first.weight.mul_(s)
        self.clip(first.weight, x / s)
        down = mlp.down_proj
        a, mean = self.inputs("ffn.down_proj.weight", down.weight.shape[1])
        if gated:  # down reads silu(gate) * up: dividing up's rows divides its input (GELU's has no such producer)
            s = self.search([(down.weight, a)], mean)
            scale_rows(first.weight, first.bias, first.weight.shape[0] // 2, s)
            down.weight.mul_(s)
            a = a / s
        self.clip(down.weight, a)

    def fold_moe(self, moe: MoE, norm: nn.Module) -> None:
        experts, hidden, ffn = moe.w13.shape[0], moe.w13.shape[2], moe.w13.shape[1] // 2
        xs = [self.inputs(f"ffn.w13.{e}", hidden)[0] for e in range(experts)]
        used = [e for e in range(experts) if xs[e].shape[0]]

        def expert_outputs(w13s: list[torch.Tensor]) -> torch.Tensor:  # each expert's output on its own tokens
            outs = []
            for e, w13 in zip(used, w13s):
                gate_up = xs[e] @ w13.T
                outs.append((F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]) @ moe.w2[e].float().T)
            return torch.cat(outs)
        s = self.search([(moe.w13[e], xs[e]) for e in used], self.capture.moe_input.mean_abs(hidden), expert_outputs)
        scale_norm(norm, s)
        moe.router.weight.mul_(s)  # the router stays float: scaling its columns keeps its logits exactly
        moe.w13.mul_(s)
        for e in range(experts):
            self.clip(moe.w13[e], xs[e] / s)
            a, mean = self.inputs(f"ffn.w2.{e}", ffn)
            s2 = self.search([(moe.w2[e], a)], mean)
            scale_rows(moe.w13[e], None, ffn, s2)
            moe.w2[e].mul_(s2)
            self.clip(moe.w2[e], a / s2)
