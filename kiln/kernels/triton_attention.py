"""Launcher of kiln's unified paged attention (contract: reference.paged_attention; kernels in
triton_attention_kernels.py): checks the inputs, picks tiles from a small table, and chooses split-K decode when the
context is long relative to the work the batch gives the GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kiln.kernels.triton_attention_kernels import paged_attention_kernel, reduce_splits_kernel
from kiln.kernels.triton_common import FLOAT_DTYPES, INDEX_DTYPES, cdiv, check_device, check_shape, check_tensor
from kiln.kernels.triton_common import dot_precision, dot_upcast, multiprocessor_count, next_power_of_2, while_loops
from kiln.kernels.triton_kv_cache import check_kv_scales
from kiln.quant.kv_cache import QUANTIZED_KV_DTYPES, KVScales

MAX_HEAD_DIM = 256
# A split-K partition covers at least this many keys (two BLOCK_N steps, so the loads of one overlap the math of
# the other): below it the partials' write and merge cost more than the parallelism gains. The grid's split count
# is bounded with it (from the context bound); each sequence's used splits with the config's keys_per_split.
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 32

# Buckets of the launch-choice table: a value maps to the smallest bucket >= it (the last bucket above that).
GROUP_BUCKETS = (1, 8, 16)  # MHA (MPT, Baichuan); GQA up to 8 heads per kv head (DBRX: 6); wider groups
BATCH_BUCKETS = (1, 8, 32, 256)  # sequences in the launch (a CUDA graph's padded batch size)
CONTEXT_BUCKETS = (256, 1024, 2048, 4096, 1 << 30)  # the context bound (max_seq_len under graphs)


@dataclass(frozen=True)
class AttentionConfig:
    """Launch choices of the attention kernel: BLOCK_M rows (query tokens x heads of a kv group), BLOCK_N keys per
    step, warps and pipeline stages; for decode split-K, the fewest keys a sequence gives each split it uses
    (`keys_per_split`, a multiple of block_n), the most splits of the grid, and whether the partials are merged in
    the same kernel by the last split to finish (`fused_merge`) or by a second kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    keys_per_split: int = 256
    max_splits: int = MAX_SPLITS
    fused_merge: bool = True

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.keys_per_split % self.block_n != 0 or self.max_splits < 1:
            raise ValueError(f"bad AttentionConfig {self}: block_n must be >= 16, keys_per_split a multiple of it, "
                             "max_splits >= 1")


@dataclass(frozen=True)
class AttentionKey:
    """Where a launch falls in the table: phase ("decode"/"prefill"), padded head_dim, and the buckets of the GQA
    group, the batch's sequences and the context bound. All come from shapes and host-side bounds, never from
    tensor contents, so a CUDA graph's launch keeps its choice."""

    phase: str
    head_dim: int
    group: int
    batch: int
    context: int


def _bucket(value: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if value <= b), buckets[-1])


def attention_key(decode: bool, head_dim_pad: int, group: int, seqs: int, max_context: int) -> AttentionKey:
    """The table key of a launch (see AttentionKey)."""
    return AttentionKey("decode" if decode else "prefill", head_dim_pad, _bucket(group, GROUP_BUCKETS),
                        _bucket(seqs, BATCH_BUCKETS), _bucket(max_context, CONTEXT_BUCKETS))


# The engine's launches merge split-K partials inside the attention kernel (the last split to finish merges,
# ordered by an atomic counter): one launch per layer instead of two. Its race test
# (tests/test_kernels_gpu.py test_fused_split_merge_is_race_free) passed on an H200; explicit configs can still ask
# for the two-kernel merge. One split needs no merge either way.
FUSED_MERGE_BY_DEFAULT = True


def _table_config(*args: int, **kwargs: int) -> AttentionConfig:
    """A built-in table entry: the merge follows FUSED_MERGE_BY_DEFAULT."""
    return AttentionConfig(*args, **kwargs, fused_merge=FUSED_MERGE_BY_DEFAULT)


# (phase, padded head_dim) -> tiles, the default of every bucket. Decode is bandwidth-bound: the smallest M that
# tl.dot takes (16) and a wide key step to keep loads in flight. Prefill is matrix-bound: 128 query rows per K/V
# tile, as FlashAttention-2 on Hopper, 64 rows where the fp32 accumulator of a 256-wide head would spill.
_BASE_CONFIGS: dict[tuple[str, int], AttentionConfig] = {
    ("decode", 16): _table_config(16, 64, 4, 2),
    ("decode", 32): _table_config(16, 64, 4, 2),
    ("decode", 64): _table_config(16, 64, 4, 3),
    ("decode", 128): _table_config(16, 64, 4, 3),
    ("decode", 256): _table_config(16, 32, 4, 2, keys_per_split=128),
    ("prefill", 16): _table_config(128, 64, 4, 2),
    ("prefill", 32): _table_config(128, 64, 4, 2),
    ("prefill", 64): _table_config(128, 64, 4, 2),
    ("prefill", 128): _table_config(128, 64, 8, 2),
    ("prefill", 256): _table_config(64, 32, 8, 2),
}

# Decode choices by bucket where they differ from the base: the table the GPU sessions tune with
# `benchmarks/bench_kernels.py --only attn --attn_sweep` (MPT-7B: head 128, group 1; DBRX: head 128, group 6 -> 8).
# Not yet measured (2026-11 session without a GPU): reasoned starting points.
# - batch 32 and up: 1024 programs (MPT) already fill the GPU without splits, so what matters is how many programs
#   an SM holds: 2 stages of 64-key K+V tiles (32 KiB each) let 3 programs share an SM instead of 2 with 3 stages.
# - batch 1: keys_per_split 256 keeps a 160-token context in one split (one kernel, no partials, no merge);
#   longer contexts split in 256-key pieces up to the grid's count.
_TUNED_CONFIGS: dict[AttentionKey, AttentionConfig] = {
    AttentionKey("decode", 128, group, 32, context): _table_config(16, 64, 4, 2)
    for group in (1, 8) for context in CONTEXT_BUCKETS
} | {
    AttentionKey("decode", 128, group, 256, context): _table_config(16, 64, 4, 2)
    for group in (1, 8) for context in CONTEXT_BUCKETS
}


def attention_config(decode: bool, head_dim_pad: int, group: int, seqs: int = 1,
                     max_context: int = 0) -> AttentionConfig:
    """Launch choices for a phase, padded head_dim, GQA group, batch and context bound: the table's entry for the
    bucket, else the phase's default; BLOCK_M grows to hold at least one token's whole kv group."""
    key = attention_key(decode, head_dim_pad, group, seqs, max_context)
    config = _TUNED_CONFIGS.get(key) or _BASE_CONFIGS[(key.phase, head_dim_pad)]
    return replace(config, block_m=max(config.block_m, next_power_of_2(group)))


def register_attention_config(key: AttentionKey, config: AttentionConfig) -> None:
    """Set the table's entry for one bucket (a tuning session's result; decode entries only matter for decode)."""
    if key.phase not in ("decode", "prefill") or (key.phase, key.head_dim) not in _BASE_CONFIGS:
        raise ValueError(f"no attention phase/head_dim {key.phase}/{key.head_dim}; head_dim is padded to 16..256")
    _TUNED_CONFIGS[key] = config


# Split counters of the fused merge, one int32 per (query tile, kv head), kept at 0 between launches by the kernel
# itself (the last split of each resets its counter). One buffer per device, only grown (never freed: captured
# graphs hold its address). Launches that share it must run in stream order, as one engine's layers do.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OLD_COUNTERS: list[torch.Tensor] = []


def _split_counters(count: int, device: torch.device) -> torch.Tensor:
    counters = _COUNTERS.get(device)
    if counters is not None and counters.numel() >= count:
        return counters
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Zeroed by a memset inside this graph (so on every replay); not cached: eager launches never saw it run.
        return torch.zeros(count, dtype=torch.int32, device=device)
    if counters is not None:
        _OLD_COUNTERS.append(counters)
    _COUNTERS[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _check_attention_inputs(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, alibi_slopes,
                            kv_scales) -> None:
    check_tensor("query", query, 3, FLOAT_DTYPES)
    device = query.device
    check_device(device)
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES + QUANTIZED_KV_DTYPES, device)
    check_tensor("v_cache", v_cache, 4, (k_cache.dtype,), device)
    check_kv_scales(k_cache, kv_scales, device)
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
    num_programs: int, max_context: int, device: torch.device, decode: bool,
    keys_per_split: int = MIN_KEYS_PER_SPLIT, max_splits: int = MAX_SPLITS,
) -> int:
    """Split-K partitions of the grid for a decode batch: enough programs to fill the GPU twice over, each with at
    least `keys_per_split` keys of `max_context`. Prefill tiles already give parallelism over queries, so it never
    splits. The count depends only on the arguments, so a CUDA graph captured with the engine's max_seq_len keeps
    a valid grid for every context up to it (the kernel spreads each sequence's actual keys over the splits, and
    with the fused merge uses only as many as its length fills)."""
    if not decode or max_context < 2 * keys_per_split:
        return 1
    wanted = cdiv(2 * multiprocessor_count(device), max(num_programs, 1))
    return max(1, min(wanted, max_context // keys_per_split, max_splits))


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
    config: AttentionConfig | None = None,
    kv_scales: KVScales | None = None,  # an INT8/FP8 cache's scales
) -> torch.Tensor:  # [tokens, heads, head_dim]
    """Triton version of reference.paged_attention. Never syncs with the host: `max_query_len` (1 marks a decode
    batch; without it a batch with one token per sequence is taken as decode; when it fits one query tile, each
    sequence gets exactly one program row and no search) and `max_seq_len` (else the block table's width bounds the
    context) only steer the launch choices; `num_splits` forces the grid's split count and `config` the table's
    choice (tuning). The grid depends on the shapes and these bounds only, never on tensor contents, so the launch
    can be captured in a CUDA graph."""
    _check_attention_inputs(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, alibi_slopes, kv_scales)
    tokens, heads, head_dim = query.shape
    seqs = seq_lens.shape[0]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if tokens == 0 or seqs == 0:
        return out
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    head_dim_pad = max(16, next_power_of_2(head_dim))
    decode = max_query_len == 1 if max_query_len is not None else tokens == seqs
    max_context = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    if config is None:
        config = attention_config(decode, head_dim_pad, group, seqs, max_context)
    elif config.block_m < next_power_of_2(group):
        raise ValueError(f"config.block_m {config.block_m} cannot hold a kv group of {group} heads; use >= "
                         f"{next_power_of_2(group)}")
    block_q = config.block_m // group
    one_tile = max_query_len is not None and max_query_len <= block_q
    # Without a bound every sequence may need several tiles: this upper bound of the tile count needs no sync, and
    # programs past a sequence's last tile return at once.
    q_tiles = seqs if one_tile else tokens // block_q + seqs
    if num_splits is None:
        num_splits = choose_num_splits(seqs * kv_heads, max_context, query.device, decode, config.keys_per_split,
                                       config.max_splits)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return _launch(query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, alibi_slopes, scale,
                   config, num_splits, q_tiles, one_tile, kv_scales)


def _launch(query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, alibi_slopes, scale: float,
            config: AttentionConfig, num_splits: int, q_tiles: int, one_tile: bool,
            kv_scales: KVScales | None) -> torch.Tensor:
    tokens, heads, head_dim = query.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    head_dim_pad = max(16, next_power_of_2(head_dim))
    part_acc, part_ml, counters = out, out, seq_lens  # unused unless split
    if num_splits > 1:
        part_acc = torch.empty(num_splits, tokens, heads, head_dim, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(num_splits, tokens, heads, 2, dtype=torch.float32, device=query.device)
        if config.fused_merge:
            counters = _split_counters(q_tiles * kv_heads, query.device)
    alibi = alibi_slopes if alibi_slopes is not None else query
    paged_attention_kernel[(q_tiles, kv_heads, num_splits)](
        query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, alibi, part_acc, part_ml, counters,
        kv_scales.k_scale if kv_scales else query, kv_scales.v_scale if kv_scales else query,
        float(scale) * math.log2(math.e), seq_lens.shape[0], tokens, heads,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=heads // kv_heads, BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m, BLOCK_Q=config.block_m // (heads // kv_heads), BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits, KEYS_PER_SPLIT=config.keys_per_split, FUSED_MERGE=config.fused_merge,
        ONE_TILE=one_tile, USE_ALIBI=alibi_slopes is not None, DOT_F32=dot_upcast(query.dtype, query.device),
        PRECISION=dot_precision(query.dtype), WHILE_LOOP=while_loops(query.device), QUANT_KV=kv_scales is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1 and not config.fused_merge:
        reduce_splits_kernel[(tokens, heads)](
            part_acc, part_ml, out, tokens, heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits,
            SPLITS_PAD=max(2, next_power_of_2(num_splits)), num_warps=4 if head_dim_pad >= 128 else 2,
        )
    return out
