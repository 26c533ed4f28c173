"""Plain-torch reference implementations of kiln's kernels.

These run on every device and are what the layers use on the CPU. The Triton kernels in this package have the same
signatures and are tested against these functions. Layouts shared by every implementation:

- KV cache of one layer: `k_cache`, `v_cache` of shape [num_blocks, block_size, num_kv_heads, head_dim]. Token position
  p of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.
- An INT8/FP8 cache (kiln.quant.kv_cache) comes with its layer's `KVScales`: the write quantizes, the attention
  dequantizes, as that module's contract says; a float cache has none.
- A batch is packed: the new tokens of all sequences are concatenated ([tokens, ...]); `query_start_loc` [seqs + 1]
  gives each sequence's range and `seq_lens` [seqs] its total length after this step (cached + new tokens), so the
  new tokens of sequence b sit at positions seq_lens[b] - q_len_b ... seq_lens[b] - 1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kiln.quant import kv_cache as kvq
from kiln.quant import fp8
from kiln.quant.group_wise import dequantize_groups
from kiln.quant.sq_math import int8_matmul, quantize_activation, sq_linear
from kiln.quant.weight_only import dequantize


def write_kv_cache(
    key: torch.Tensor,  # [tokens, kv_heads, head_dim]
    value: torch.Tensor,  # [tokens, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [tokens] int64; a negative slot means "do not store"
    kv_scales: kvq.KVScales | None = None,  # an INT8/FP8 cache's scales
) -> None:
    """Store each token's key and value at its slot of the paged cache (quantized with `kv_scales` when given)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    if kv_scales is None:
        k_flat[slots] = key[keep].to(k_cache.dtype)
        v_flat[slots] = value[keep].to(v_cache.dtype)
    else:
        k_flat[slots] = kvq.quantize(key[keep], kv_scales.k_inv, k_cache.dtype)
        v_flat[slots] = kvq.quantize(value[keep], kv_scales.v_inv, v_cache.dtype)


def gather_sequence_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:  # [seq_len, kv_heads, head_dim]
    """The first `seq_len` cached tokens of one sequence, in order."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, kv_heads, head_dim]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention(
    query: torch.Tensor,  # [tokens, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    block_tables: torch.Tensor,  # [seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [seqs + 1] int32
    seq_lens: torch.Tensor,  # [seqs] int32
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [heads] float32
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    kv_scales: kvq.KVScales | None = None,  # an INT8/FP8 cache's scales
) -> torch.Tensor:  # [tokens, heads, head_dim]
    """Causal attention of the new tokens over everything cached for their sequence (prefill, chunked prefill and
    decode alike). ALiBi adds `slope_h * (key_pos - query_pos)` to the scores, the query-relative form, which is
    softmax-equivalent to MPT's and Baichuan's own. Scores and softmax run in float32. `max_query_len` and
    `max_seq_len` are the batch's bounds, hints that the Triton version uses to pick tiles; here they are unused.
    A quantized cache is dequantized to float32 (`q * scale`) before the scores."""
    out = torch.empty_like(query)
    heads, kv_heads = query.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    for b, seq_len in enumerate(lengths):
        q = query[starts[b] : starts[b + 1]].float()  # [q_len, heads, head_dim]
        q_len = q.shape[0]
        if q_len == 0:
            continue
        k = gather_sequence_kv(k_cache, block_tables[b], seq_len)  # [seq_len, kv_heads, head_dim]
        v = gather_sequence_kv(v_cache, block_tables[b], seq_len)
        if kv_scales is None:
            k, v = k.float(), v.float()
        else:
            k, v = kvq.dequantize(k, kv_scales.k_scale), kvq.dequantize(v, kv_scales.v_scale)
        k = k.repeat_interleave(group, dim=1)  # [seq_len, heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [heads, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        distance = (k_pos[None, :] - q_pos[:, None]).float()  # [q_len, seq_len], <= 0 where visible
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None, None] * distance[None]
        scores = scores.masked_fill(distance[None] > 0, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[b] : starts[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


def fused_moe(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden]: rows [gate; up]
    w2: torch.Tensor,  # [local_experts, hidden, ffn]
    topk_weights: torch.Tensor,  # [tokens, top_k] float32
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int = 0,
) -> torch.Tensor:  # [tokens, hidden]
    """Mixture of GLU experts: `sum_k w_k * (silu(x @ gate_e.T) * (x @ up_e.T)) @ down_e.T`.

    Only experts `expert_start .. expert_start + local_experts - 1` live here (expert parallel); a token's
    choices of other experts contribute nothing on this rank, and the ranks' outputs add up to the full result."""
    return glu_experts(hidden, w13.shape[0], lambda e: (w13[e], w2[e]), topk_weights, topk_ids, expert_start)


def fused_moe_weight_only(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden (INT4: hidden / 2)] int8
    w13_scale: torch.Tensor,  # [local_experts, 2 * ffn]
    w2: torch.Tensor,  # [local_experts, hidden, ffn (INT4: ffn / 2)] int8
    w2_scale: torch.Tensor,  # [local_experts, hidden]
    topk_weights: torch.Tensor,  # [tokens, top_k] float32
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int,
    bits: int,  # 8 or 4 (kiln.quant.weight_only's layout)
) -> torch.Tensor:  # [tokens, hidden]
    """fused_moe over weight-only per-channel quantized experts: each chosen expert's weights are dequantized to the
    activation dtype, then multiplied exactly as fused_moe does (only the experts that tokens chose are expanded)."""
    def expert(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize(w13[e], w13_scale[e], bits, hidden.dtype),
                dequantize(w2[e], w2_scale[e], bits, hidden.dtype))

    return glu_experts(hidden, w13.shape[0], expert, topk_weights, topk_ids, expert_start)


def fused_moe_group_wise(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden / 2] int8 (4-bit unsigned, two per byte)
    w13_scale: torch.Tensor,  # [local_experts, 2 * ffn, groups of hidden]
    w13_zero: torch.Tensor,  # like w13_scale, integer-valued
    w2: torch.Tensor,  # [local_experts, hidden, ffn / 2] int8
    w2_scale: torch.Tensor,  # [local_experts, hidden, groups of ffn (+1 when the ffn slice starts mid-group)]
    w2_zero: torch.Tensor,  # like w2_scale
    topk_weights: torch.Tensor,  # [tokens, top_k] float32
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int,
    bits: int,  # 4 (or 8)
    group_size: int,
    w13_k_offset: int = 0,  # always 0: w13's input (hidden) is never split
    w2_k_offset: int = 0,  # where this rank's ffn slice starts inside its first group
) -> torch.Tensor:  # [tokens, hidden]
    """fused_moe over group-wise quantized experts (kiln.quant.group_wise's format): each chosen expert's weights are
    dequantized to the activation dtype, then multiplied exactly as fused_moe does."""
    def expert(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_groups(w13[e], w13_scale[e], w13_zero[e], bits, group_size, hidden.dtype, w13_k_offset),
                dequantize_groups(w2[e], w2_scale[e], w2_zero[e], bits, group_size, hidden.dtype, w2_k_offset))

    return glu_experts(hidden, w13.shape[0], expert, topk_weights, topk_ids, expert_start)


def glu_experts(
    hidden: torch.Tensor,  # [tokens, hidden]
    num_local: int,
    expert: Callable[[int], tuple[torch.Tensor, torch.Tensor]],  # local e -> (w13 [2 * ffn, hidden], w2 [hidden, ffn])
    topk_weights: torch.Tensor,  # [tokens, top_k] float32
    topk_ids: torch.Tensor,  # [tokens, top_k]
    expert_start: int,
    between: Callable[[torch.Tensor], torch.Tensor] | None = None,  # applied to the GLU intermediate (FP8: fake-quant)
) -> torch.Tensor:  # [tokens, hidden]
    tokens = hidden.shape[0]
    out = torch.zeros(tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    local_ids = topk_ids.long() - expert_start
    for e in torch.unique(local_ids).tolist():
        if e < 0 or e >= num_local:
            continue
        w13_e, w2_e = expert(e)
        ffn = w13_e.shape[0] // 2
        token_idx, slot = torch.where(local_ids == e)
        x = hidden[token_idx]
        gate_up = x @ w13_e.t()  # [n, 2 * ffn]
        act = F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]
        if between is not None:
            act = between(act)
        y = act @ w2_e.t()  # [n, hidden]
        out.index_add_(0, token_idx, y.float() * topk_weights[token_idx, slot, None].float())
    return out.to(hidden.dtype)


def fused_moe_sq(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden] int8, rows [gate; up]
    w13_scale: torch.Tensor,  # [local_experts, 2 * ffn] per output channel (per tensor: every entry the same)
    w13_act: torch.Tensor | None,  # [1] static scale of the MoE input; None: per token
    w2: torch.Tensor,  # [local_experts, hidden, ffn] int8
    w2_scale: torch.Tensor,  # [local_experts, hidden]
    w2_act: torch.Tensor | None,  # [local_experts] static scale of each expert's w2 input; None: per token
    w2_smoother: torch.Tensor,  # [local_experts, ffn] multiplied onto the GLU intermediate before it is quantized
    topk_weights: torch.Tensor,  # [tokens, top_k] float
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int,
) -> torch.Tensor:  # [tokens, hidden]
    """The SmoothQuant W8A8 fused MoE (kiln.quant.smoothquant): the input quantized once for every expert, each
    chosen expert's INT8 products exact, the GLU intermediate rounded to the engine dtype (as the float MoE holds
    it), smoothed and quantized before w2, whose output is rounded to the engine dtype before the routing weight."""
    out = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32, device=hidden.device)
    local_ids = topk_ids.long() - expert_start
    qx, x_scale = quantize_activation(hidden, w13_act)
    ffn = w13.shape[1] // 2
    for e in torch.unique(local_ids).tolist():
        if e < 0 or e >= w13.shape[0]:
            continue
        token_idx, slot = torch.where(local_ids == e)
        gate_up = int8_matmul(qx[token_idx], w13[e]) * x_scale[token_idx] * w13_scale[e].float()
        act = (F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]).to(hidden.dtype)
        y = sq_linear(act, w2[e], w2_scale[e], None if w2_act is None else w2_act[e:e + 1], w2_smoother[e], None)
        out.index_add_(0, token_idx, y.float() * topk_weights[token_idx, slot, None].float())
    return out.to(hidden.dtype)


def fused_moe_fp8(
    hidden: torch.Tensor,  # [tokens, hidden]
    w13: torch.Tensor,  # [local_experts, 2 * ffn, hidden] float8_e4m3fn
    w13_scale: torch.Tensor,  # [local_experts, 1 or 2 * ffn]
    w2: torch.Tensor,  # [local_experts, hidden, ffn] float8_e4m3fn
    w2_scale: torch.Tensor,  # [local_experts, 1 or hidden]
    input_scale: torch.Tensor | None,  # [1] static scale of the experts' input (None: per token)
    topk_weights: torch.Tensor,  # [tokens, top_k] float
    topk_ids: torch.Tensor,  # [tokens, top_k] int, global expert ids
    expert_start: int,
) -> torch.Tensor:  # [tokens, hidden]
    """The FP8 fused MoE (kiln.quant.fp8): the input fake-quantized as the scheme says, each chosen expert's weights
    dequantized, the GLU intermediate fake-quantized per token before w2."""
    def expert(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8.dequantize(w13[e], w13_scale[e], hidden.dtype), fp8.dequantize(w2[e], w2_scale[e], hidden.dtype)

    xq = fp8.fake_quantize_activation(hidden, input_scale)  # per token or static: the same for every expert
    return glu_experts(xq, w13.shape[0], expert, topk_weights, topk_ids, expert_start,
                       between=lambda act: fp8.fake_quantize_activation(act, None))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension with float32 statistics and affine part, rounded once to x's dtype."""
    if x.is_cuda and x.dtype == weight.dtype:
        # CUDA's layer_norm accumulates fp16/bf16 inputs in float32 and applies the affine part in float32 before
        # the single rounding: the float path below in one kernel.
        return F.layer_norm(x, weight.shape, weight, bias, eps)
    y = F.layer_norm(x.float(), weight.shape, weight.float(), None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Baichuan computes it: variance in float32, the normalised value cast to the weight's dtype
    before the multiply."""
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(weight.dtype)


def add_norm(
    x: torch.Tensor,  # [tokens, dim]
    residual: torch.Tensor | None,  # [tokens, dim] or None
    weight: torch.Tensor,  # [dim]
    bias: torch.Tensor | None,  # [dim] (LayerNorm only)
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # normed [tokens, dim], summed [tokens, dim]
    """The pre-norm block's `summed = x + residual` (rounded to x's dtype, as a separate add would be; `x` itself
    when residual is None) and `norm(summed)`: RMSNorm when `rms`, else LayerNorm with the optional bias."""
    summed = x if residual is None else x + residual
    normed = rms_norm(summed, weight, eps) if rms else layer_norm(summed, weight, bias, eps)
    return normed, summed


def linear(
    x: torch.Tensor,  # [rows, in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None = None,  # [out_features]
) -> torch.Tensor:  # [rows, out_features]
    """y = x @ weight^T + bias, as torch's Linear computes it (the thin-matrix GEMM's contract)."""
    return F.linear(x, weight, bias)
