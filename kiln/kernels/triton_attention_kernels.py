"""Triton kernels of kiln's unified paged attention (the launcher is in triton_attention.py).

An INT8/FP8 cache (QUANT_KV) is read as 8-bit tiles and dequantized in registers with the kv head's scales
(kiln.quant.kv_cache). One program owns a tile of BLOCK_M rows = BLOCK_Q query tokens of one sequence x the GROUP query heads that share
one kv head (row r is token r // GROUP, head r % GROUP), so each K/V tile is loaded once for the whole group. It
walks the sequence's keys in BLOCK_N steps through the block table with an online softmax in float32 (base 2:
scores are pre-multiplied by log2(e)).

Split-K (flash-decoding), NUM_SPLITS > 1 programs per (tile, kv head), two flavours:
- FUSED_MERGE: the grid's NUM_SPLITS is only an upper bound fixed by the launch (so CUDA graphs keep it); each
  sequence uses n_used = min(NUM_SPLITS, cdiv(seq_len, KEYS_PER_SPLIT)) splits, from its own length on the device.
  Programs of the other splits return at once; with one split the program writes the output itself. Otherwise each
  writes its unnormalised partial, counts itself in on a per-(tile, kv head) counter, and the program that counts
  last merges the n_used partials in split order (so the result does not depend on which program finished last:
  bitwise reproducible) and resets the counter to 0 for the next launch.
- not fused: every split covers 1/NUM_SPLITS of the keys and reduce_splits_kernel merges all NUM_SPLITS partials
  (two launches; kept as the table's fallback).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, target, BLOCK_Q: tl.constexpr):
    """Largest b with query_start_loc[b] // BLOCK_Q + b <= target: sequence b's first tile has that index, so the
    grid needs no host-side table (and no GPU->CPU sync) to map programs to sequences."""
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        if first_tile <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_block(
    start, q, acc, m_i, l_i, q_pos, slope, qk_scale, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_offset,
    kv_end, dims, dim_ok, stride_kb, stride_ks, stride_vb, stride_vs,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_ALIBI: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold the keys start .. start + BLOCK_N - 1 (those < kv_end) into the running (acc, m_i, l_i) of q's rows."""
    k_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    k_ok = k_pos < kv_end
    block = tl.load(block_table_ptr + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    within = k_pos % BLOCK_SIZE
    k_off = block * stride_kb + within * stride_ks + kv_offset  # [BLOCK_N]
    v_off = block * stride_vb + within * stride_vs + kv_offset
    k = tl.load(k_cache_ptr + k_off[None, :] + dims[:, None], mask=k_ok[None, :] & dim_ok[:, None],
                other=0.0)  # [HEAD_DIM_PAD, BLOCK_N]
    v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=k_ok[:, None] & dim_ok[None, :],
                other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
    if DOT_F32:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision=PRECISION)
    else:
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    s = s * qk_scale  # softmax scale x log2(e): the softmax runs in base 2
    if USE_ALIBI:
        s += slope[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
    visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet (possible in a split) keeps m = -inf; subtracting 0 instead keeps
    # exp2 at 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _split_range(seq_len, kv_end, split, NUM_SPLITS: tl.constexpr, KEYS_PER_SPLIT: tl.constexpr,
                 BLOCK_N: tl.constexpr, FUSED_MERGE: tl.constexpr):
    """(kv_start, kv_end, n_used) of this program's split. Fused: a sequence spreads its keys over as many splits
    as it has KEYS_PER_SPLIT-key chunks (at most NUM_SPLITS), whole BLOCK_N tiles each, every used split non-empty;
    not fused: always NUM_SPLITS equal chunks (some may be empty)."""
    kv_tiles = tl.cdiv(tl.maximum(seq_len, 1), BLOCK_N)
    if FUSED_MERGE:
        wanted = tl.minimum(tl.cdiv(tl.maximum(seq_len, 1), KEYS_PER_SPLIT), NUM_SPLITS)
        chunk = tl.cdiv(kv_tiles, wanted) * BLOCK_N
        n_used = tl.cdiv(kv_tiles * BLOCK_N, chunk)
    else:
        chunk = tl.cdiv(kv_tiles, NUM_SPLITS) * BLOCK_N
        n_used = tl.zeros([], dtype=tl.int32) + NUM_SPLITS
    kv_start = split * chunk
    return kv_start, tl.minimum(kv_end, kv_start + chunk), n_used


@triton.jit
def _store_partial(part_acc_ptr, part_ml_ptr, split, base, plane, acc, m_i, l_i, dims, out_mask, row_ok,
                   HEAD_DIM: tl.constexpr):
    """Partials: acc [splits, tokens, heads, HEAD_DIM], (m, l) [splits, tokens, heads, 2]; base = token * heads +
    head per row, plane = tokens * heads."""
    row = split * plane + base  # [BLOCK_M] int64
    tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
    tl.store(part_ml_ptr + row * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_partial(split, acc, m_i, l_i, part_acc_ptr, part_ml_ptr, base, plane, dims, out_mask, row_ok,
                   HEAD_DIM: tl.constexpr):
    """Fold split `split`'s partial into the running (acc, m_i, l_i). Loads go to L2 (.cg): the partials were
    written by other programs of this launch, never by an earlier read of this SM's L1."""
    row = split * plane + base
    m_s = tl.load(part_ml_ptr + row * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
    acc_s = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :], mask=out_mask, other=0.0,
                    cache_modifier=".cg")  # [BLOCK_M, HEAD_DIM_PAD]
    m_new = tl.maximum(m_i, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows no split saw a key for stay 0, not NaN
    alpha = tl.math.exp2(m_i - m_safe)
    beta = tl.math.exp2(m_s - m_safe)
    return acc * alpha[:, None] + acc_s * beta[:, None], m_new, l_i * alpha + l_s * beta


@triton.jit
def _store_out(out_ptr, out_off, acc, l_i, out_mask):
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with no visible key (graph padding) gets 0
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _finish_fused(out_ptr, out_off, acc, m_i, l_i, part_acc_ptr, part_ml_ptr, counters_ptr, split, n_used, base,
                  plane, dims, out_mask, row_ok, HEAD_DIM: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """Write the output directly when the sequence used one split; else publish this split's partial and, if this
    program is the last of its (tile, kv head) to arrive, merge all n_used partials in split order."""
    if n_used == 1:
        _store_out(out_ptr, out_off, acc, l_i, out_mask)
    else:
        _store_partial(part_acc_ptr, part_ml_ptr, split, base, plane, acc, m_i, l_i, dims, out_mask, row_ok,
                       HEAD_DIM)
        # Every thread's partial stores precede the release of the counter (the CTA barrier, then acq_rel at GPU
        # scope), so the program that sees n_used - 1 arrivals before its own sees every partial.
        tl.debug_barrier()
        counter = counters_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == n_used - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch (or graph replay)
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            m_i = tl.zeros(m_i.shape, dtype=tl.float32) - float("inf")
            l_i = tl.zeros(l_i.shape, dtype=tl.float32)
            if WHILE_LOOP:
                s = 0
                while s < n_used:
                    acc, m_i, l_i = _merge_partial(s, acc, m_i, l_i, part_acc_ptr, part_ml_ptr, base, plane, dims,
                                                   out_mask, row_ok, HEAD_DIM)
                    s += 1
            else:
                for s in range(0, n_used):
                    acc, m_i, l_i = _merge_partial(s, acc, m_i, l_i, part_acc_ptr, part_ml_ptr, base, plane, dims,
                                                   out_mask, row_ok, HEAD_DIM)
            _store_out(out_ptr, out_off, acc, l_i, out_mask)


# The batch's sequence and token counts change with every step of a serving engine. Triton would compile a variant
# per class of each (1, a multiple of 16, other: nine combinations, ~0.5 s of compiling each on an H100), and a served
# workload met them one by one mid-stream: an H100 serve profile spent 4.7 s of a 13.5 s sweep compiling this kernel
# (docs/performance.md, session 7). Not specializing costs nothing measurable: they only bound loops and masks.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, alibi_ptr,
    part_acc_ptr, part_ml_ptr, counters_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, num_seqs, num_tokens, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    KEYS_PER_SPLIT: tl.constexpr, FUSED_MERGE: tl.constexpr,
    ONE_TILE: tl.constexpr, USE_ALIBI: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr, QUANT_KV: tl.constexpr,
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_TILE:
        # Every sequence's new tokens fit one tile (decode): program row b is sequence b, no search needed.
        seq = tl.program_id(0)
        q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
        q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
        tile = 0
    else:
        seq = _find_sequence(query_start_loc_ptr, num_seqs, tl.program_id(0), BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
        q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
        tile = tl.program_id(0) - (q_start // BLOCK_Q + seq)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    # Causality bounds the keys of this tile by its last query's position.
    kv_end = seq_len - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_Q)
    kv_start = 0
    n_used = 1
    if NUM_SPLITS > 1:
        kv_start, kv_end, n_used = _split_range(seq_len, kv_end, split, NUM_SPLITS, KEYS_PER_SPLIT, BLOCK_N,
                                                FUSED_MERGE)
    if (tile * BLOCK_Q >= q_len) | (split >= n_used):
        return  # a spare program of the over-provisioned grid, or a split this sequence is too short to use

    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // GROUP  # token index within the sequence's new tokens
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = seq_len - q_len + tok  # absolute position of each row's query
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    token = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * LOG2E

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_offset = kv_head * stride_kh
    if QUANT_KV:
        # An INT8/FP8 cache: tiles are converted to the query's dtype as loaded (exact: |q| <= 127 or an e4m3
        # value), and the head's scales are folded into the softmax scale (K) and the output (V, after the loop).
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
    if WHILE_LOOP:
        start = kv_start
        while start < kv_end:
            acc, m_i, l_i = _attend_block(
                start, q, acc, m_i, l_i, q_pos, slope, qk_scale, k_cache_ptr, v_cache_ptr, table, kv_offset, kv_end,
                dims, dim_ok, stride_kb, stride_ks, stride_vb, stride_vs,
                BLOCK_SIZE, BLOCK_N, USE_ALIBI, DOT_F32, PRECISION)
            start += BLOCK_N
    else:
        for start in range(kv_start, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                start, q, acc, m_i, l_i, q_pos, slope, qk_scale, k_cache_ptr, v_cache_ptr, table, kv_offset, kv_end,
                dims, dim_ok, stride_kb, stride_ks, stride_vb, stride_vs,
                BLOCK_SIZE, BLOCK_N, USE_ALIBI, DOT_F32, PRECISION)
    if QUANT_KV:
        acc = acc * tl.load(v_scale_ptr + kv_head)  # before any split merge: the merge is linear in acc
    out_mask = row_ok[:, None] & dim_ok[None, :]
    out_off = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    base = token * num_heads + head  # [BLOCK_M] int64: the row's (token, head) within a split's partials
    plane = (tl.zeros([], dtype=tl.int64) + num_tokens) * num_heads
    if NUM_SPLITS == 1:
        _store_out(out_ptr, out_off, acc, l_i, out_mask)
    elif FUSED_MERGE:
        _finish_fused(out_ptr, out_off, acc, m_i, l_i, part_acc_ptr, part_ml_ptr, counters_ptr, split, n_used, base,
                      plane, dims, out_mask, row_ok, HEAD_DIM, WHILE_LOOP)
    else:
        _store_partial(part_acc_ptr, part_ml_ptr, split, base, plane, acc, m_i, l_i, dims, out_mask, row_ok,
                       HEAD_DIM)


@triton.jit(do_not_specialize=["num_tokens"])
def reduce_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, num_tokens, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Merge the NUM_SPLITS partial softmax results of one (token, head) (grid: tokens x heads)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    row = (splits * num_tokens + token) * num_heads + head  # [SPLITS_PAD]
    m = tl.load(part_ml_ptr + row * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=split_ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for empty splits
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :],
                  mask=split_ok[:, None] & dim_ok[None, :], other=0.0)  # [SPLITS_PAD, HEAD_DIM_PAD]
    denom = tl.sum(weight * l, 0)
    # A row with no visible key at all (a padding row of a CUDA graph) has denom 0: give it 0, not NaN.
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)
