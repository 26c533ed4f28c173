"""Launcher of kiln's unified paged attention (contract: reference.paged_attention; kernels in
triton_attention_kernels.py): checks the inputs, picks tiles from a small table, and chooses split-K decode when the
context is long relative to the work the batch gives the GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kiln.kernels.triton_attention_kernels import paged_attention_kernel, reduce_splits_kernel
from kiln.kernels.triton_common import FLOAT_DTYPES, INDEX_DTYPES, cdiv, check_device, check_shape, check_tensor
from kiln.kernels.triton_common import dot_precision, dot_upcast, multiprocessor_count, next_power_of_2, while_loops

MAX_HEAD_DIM = 256
# A split-K partition covers at least this many keys (two BLOCK_N steps, so the loads of one overlap the math of
# the other): below it the partials' write and merge cost more than the parallelism gains.
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 32


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape of the attention kernel: BLOCK_M rows (query tokens x heads of a kv group), BLOCK_N keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (phase, padded head_dim) -> tiles. Decode is bandwidth-bound: the smallest M that tl.dot takes (16) and a wide
# key step to keep loads in flight. Prefill is matrix-bound: 128 query rows per K/V tile, as FlashAttention-2 on
# Hopper, 64 rows where the fp32 accumulator of a 256-wide head would spill.
_ATTENTION_CONFIGS: dict[tuple[str, int], AttentionConfig] = {
    ("decode", 16): AttentionConfig(16, 64, 4, 2),
    ("decode", 32): AttentionConfig(16, 64, 4, 2),
    ("decode", 64): AttentionConfig(16, 64, 4, 3),
    ("decode", 128): AttentionConfig(16, 64, 4, 3),
    ("decode", 256): AttentionConfig(16, 32, 4, 2),
    ("prefill", 16): AttentionConfig(128, 64, 4, 2),
    ("prefill", 32): AttentionConfig(128, 64, 4, 2),
    ("prefill", 64): AttentionConfig(128, 64, 4, 2),
    ("prefill", 128): AttentionConfig(128, 64, 8, 2),
    ("prefill", 256): AttentionConfig(64, 32, 8, 2),
}


def attention_config(decode: bool, head_dim_pad: int, group: int) -> AttentionConfig:
    """Tiles for a phase and padded head_dim; BLOCK_M grows to hold at least one token's whole kv group."""
    config = _ATTENTION_CONFIGS[("decode" if decode else "prefill", head_dim_pad)]
    block_m = max(config.block_m, next_power_of_2(group))
    return AttentionConfig(block_m, config.block_n, config.num_warps, config.num_stages)


def _check_attention_inputs(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, alibi_slopes) -> None:
    check_tensor("query", query, 3, FLOAT_DTYPES)
    device = query.device
    check_device(device)
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES, device)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES, device)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_tensor("block_tables", block_tables, 2, INDEX_DTYPES, device)
    check_tensor("query_start_loc", query_start_loc, 1, INDEX_DTYPES, device)
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, device)
    heads, head_dim = query.shape[1], query.shape[2]
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"query has head_dim {head_dim} but the KV cache has {k_cache.shape[3]}")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"query has {heads} heads, not a multiple of the cache's {kv_heads} kv heads")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is larger than the kernel's limit {MAX_HEAD_DIM}; use the torch backend")
    seqs = seq_lens.shape[0]
    check_shape("query_start_loc", query_start_loc, (seqs + 1,))
    if block_tables.shape[0] < seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {seqs} sequences; "
                         "it needs one row per sequence")
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, 1, FLOAT_DTYPES, device)
        check_shape("alibi_slopes", alibi_slopes, (heads,))


def choose_num_splits(
    num_programs: int, max_context: int, device: torch.device, decode: bool
) -> int:
    """Split-K partitions for a decode batch: enough programs to fill the GPU twice over, each with at least
    MIN_KEYS_PER_SPLIT keys of `max_context`. Prefill tiles already give parallelism over queries, so it never
    splits. The count depends only on the arguments, so a CUDA graph captured with the engine's max_seq_len keeps
    a valid grid for every context up to it (the kernel spreads each sequence's actual keys over the splits)."""
    if not decode or max_context < 2 * MIN_KEYS_PER_SPLIT:
        return 1
    wanted = cdiv(2 * multiprocessor_count(device), max(num_programs, 1))
    return max(1, min(wanted, max_context // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def paged_attention(
    query: torch.Tensor,  # [tokens, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    block_tables: torch.Tensor,  # [seqs, max_blocks_per_seq] int
    query_start_loc: torch.Tensor,  # [seqs + 1] int
    seq_lens: torch.Tensor,  # [seqs] int
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [heads] float
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [tokens, heads, head_dim]
    """Triton version of reference.paged_attention. Never syncs with the host: `max_query_len` (1 marks a decode
    batch; without it a batch with one token per sequence is taken as decode; when it fits one query tile, each
    sequence gets exactly one program row and no search) and `max_seq_len` (else the block table's width bounds the
    context) only steer tile and split choices; `num_splits` forces a split count. The grid depends on the shapes
    and these bounds only, never on tensor contents, so the launch can be captured in a CUDA graph."""
    _check_attention_inputs(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, alibi_slopes)
    tokens, heads, head_dim = query.shape
    seqs = seq_lens.shape[0]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if tokens == 0 or seqs == 0:
        return out
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    head_dim_pad = max(16, next_power_of_2(head_dim))
    decode = max_query_len == 1 if max_query_len is not None else tokens == seqs
    config = attention_config(decode, head_dim_pad, group)
    block_q = config.block_m // group
    one_tile = max_query_len is not None and max_query_len <= block_q
    # Without a bound every sequence may need several tiles: this upper bound of the tile count needs no sync, and
    # programs past a sequence's last tile return at once.
    q_tiles = seqs if one_tile else tokens // block_q + seqs
    max_context = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(seqs * kv_heads, max_context, query.device, decode)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    part_acc, part_ml = out, out  # unused unless split
    if num_splits > 1:
        part_acc = torch.empty(num_splits, tokens, heads, head_dim, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(num_splits, tokens, heads, 2, dtype=torch.float32, device=query.device)
    alibi = alibi_slopes if alibi_slopes is not None else query
    paged_attention_kernel[(q_tiles, kv_heads, num_splits)](
        query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, alibi, part_acc, part_ml,
        float(scale) * math.log2(math.e), seqs, tokens, heads,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n, NUM_SPLITS=num_splits,
        ONE_TILE=one_tile, USE_ALIBI=alibi_slopes is not None, DOT_F32=dot_upcast(query.dtype, query.device),
        PRECISION=dot_precision(query.dtype), WHILE_LOOP=while_loops(query.device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        reduce_splits_kernel[(tokens, heads)](
            part_acc, part_ml, out, tokens, heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits,
            SPLITS_PAD=max(2, next_power_of_2(num_splits)), num_warps=4 if head_dim_pad >= 128 else 2,
        )
    return out
