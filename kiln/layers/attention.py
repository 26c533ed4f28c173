"""Multi-head / grouped-query attention over the paged KV cache, with RoPE or ALiBi."""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ConfigError, Mapping, ModelConfig
from kiln.layers.context import ForwardContext
from kiln.layers.linear import QKVParallelLinear, RowParallelLinear, kv_segment
from kiln.layers.norm import TPLayerNorm, make_norm, tp_layer_norms
from kiln.layers.position import RotaryEmbedding, alibi_slopes
from kiln.layers.sharding import split_evenly
from kiln.quant.kv_cache import KVScales


class Attention(nn.Module):
    """Fused QKV projection (optionally clamped to ±clip_qkv, on the fused output before the split, as DBRX and MPT
    do), positions (RoPE on q and k, or ALiBi slopes passed to the kernel), the KV-cache write, paged causal
    attention and the output projection. Holds this rank's heads only."""

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        tp, rank = mapping.tp_size, mapping.tp_rank
        dtype, head_dim = config.torch_dtype, config.head_size
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                          head_dim, config.linear_bias, dtype, tp, rank)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        config.linear_bias, dtype, tp, rank)
        self.num_heads, self.num_kv_heads = self.qkv_proj.local_heads, self.qkv_proj.local_kv_heads
        self.mapping, self.total_kv_heads = mapping, config.num_key_value_heads
        self.head_dim = head_dim
        self.scale = config.softmax_scale or head_dim**-0.5
        self.clip_qkv = config.clip_qkv
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.tp_qk_norm = False
        if config.qk_layernorm:
            # MPT's qk_ln normalises the whole query (d_model) and the whole key (kv_heads * head_dim) before the
            # heads are split [LLMF attention.py]; under tp each rank holds a slice of the heads, so the statistics
            # are summed over the ranks (TPLayerNorm), each rank keeping the norm weights of its own elements.
            if tp == 1:
                self.q_norm = make_norm(config, config.num_attention_heads * head_dim)
                self.k_norm = make_norm(config, config.num_key_value_heads * head_dim)
            elif config.norm_type != "layernorm":
                raise ConfigError(f"qk_layernorm with {config.norm_type} under tp_size {tp} is not supported; "
                                  "convert with --tp_size 1")
            else:
                self.tp_qk_norm = True
                kv_seg = kv_segment(config.num_key_value_heads, head_dim, tp, rank)
                q_seg = split_evenly(config.num_attention_heads * head_dim, tp, rank, "attention heads")
                args = (tp, config.norm_epsilon, config.norm_bias, dtype)
                self.q_norm, self.k_norm = TPLayerNorm(q_seg, *args), TPLayerNorm(kv_seg, *args)
        self.rotary: RotaryEmbedding | None = None
        # A buffer slot from the start ([local heads] float32 under ALiBi, else None): a plain attribute of the
        # same name would make register_buffer refuse it.
        self.register_buffer("alibi_slopes", None, persistent=False)
        self._alibi = (config.num_attention_heads, config.alibi_bias_max, rank) \
            if config.position_embedding_type == "alibi" else None
        if self._alibi is None:
            self.rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, config.rotary_base)
        self.reset_buffers()
        # Bound by the model runner once the cache is allocated: [num_blocks, block_size, kv_heads, head_dim] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # An INT8/FP8 cache's scales (kiln.quant.kv_cache.bind_kv_scales, after loading); None: a float cache.
        self.kv_scales: KVScales | None = None

    def reset_buffers(self) -> None:
        """(Re)compute the ALiBi slopes of this rank's heads on the current default device: a model built on the
        meta device computes them again when it is placed on its device (kiln.layers.materialize)."""
        if self._alibi is not None:
            total_heads, bias_max, rank = self._alibi
            slopes = alibi_slopes(total_heads, bias_max)  # [total heads] float32
            self.alibi_slopes = slopes[rank * self.num_heads : (rank + 1) * self.num_heads].clone()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # positions [tokens]; hidden [tokens, hidden_size] -> [tokens, hidden_size]
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if self.tp_qk_norm:
            q, k = tp_layer_norms([q, k], [self.q_norm, self.k_norm])  # this rank's heads, whole-vector statistics
        elif self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # [tokens, heads * head_dim], [tokens, kv_heads * head_dim]
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        meta, kernels = ctx.attn, ctx.kernels
        kernels.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.kv_scales)
        # max_query_len / max_seq_len only steer tiles and the split count (fixed ones inside a CUDA graph).
        out = kernels.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.query_start_loc,
                                      meta.seq_lens, self.scale, self.alibi_slopes,
                                      max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
                                      kv_scales=self.kv_scales)
        return self.o_proj(out.reshape(tokens, q_size))
