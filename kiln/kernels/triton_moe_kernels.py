"""Triton kernels of kiln's fused MoE (the launcher is in triton_moe.py).

Vocabulary: an *assignment* is one (token, choice) pair, flat index a = token * top_k + k. The align kernel sorts
the local assignments by expert into `sorted_ids`, each expert's run padded to a multiple of BLOCK_M with the
sentinel `num_assignments`, and records each BLOCK_M block's expert in `block_expert` (-1 past the end). Both
grouped GEMMs then take one block of rows (all one expert) x one BLOCK_N slice of columns per program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton_jit_common import dot_acc


@triton.jit
def _expert_onehot(topk_ids_ptr, start, num_assignments, expert_start, num_experts,
                   CHUNK: tl.constexpr, EXPERTS_PAD: tl.constexpr):
    """[CHUNK, EXPERTS_PAD] int32 one-hot of the local expert of assignments start .. start + CHUNK - 1 (all-zero
    rows for assignments past the end or routed to experts that live on another rank)."""
    offs = start + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_assignments, other=-1).to(tl.int32) - expert_start
    valid = (offs < num_assignments) & (ids >= 0) & (ids < num_experts)
    experts = tl.arange(0, EXPERTS_PAD)
    return ((ids[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32), offs


@triton.jit
def _align_scatter_chunk(sorted_ids_ptr, topk_ids_ptr, start, running, padded_starts, num_assignments,
                         expert_start, num_experts, CHUNK: tl.constexpr, EXPERTS_PAD: tl.constexpr):
    """Place one chunk of assignments at their sorted positions; returns the per-expert counts placed so far."""
    onehot, offs = _expert_onehot(topk_ids_ptr, start, num_assignments, expert_start, num_experts,
                                  CHUNK, EXPERTS_PAD)
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # order among this chunk's assignments of its expert
    base = tl.sum(onehot * (padded_starts + running)[None, :], 1)
    tl.store(sorted_ids_ptr + base + rank, offs, mask=tl.sum(onehot, 1) > 0)
    return running + tl.sum(onehot, 0)


@triton.jit(do_not_specialize=["num_assignments", "sorted_len", "num_blocks"])  # step sizes: one compile per config
def moe_align_kernel(
    topk_ids_ptr, sorted_ids_ptr, block_expert_ptr, num_assignments, expert_start, num_experts,
    sorted_len, num_blocks,
    BLOCK_M: tl.constexpr, EXPERTS_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program: count per expert, pad to BLOCK_M, fill, then scatter stably (a token keeps its order).
    Its loops are `while` loops on every device: one program has nothing to software-pipeline, and the
    interpreter cannot range() over runtime bounds (see triton_common.while_loops)."""
    counts = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    start = 0
    while start < num_assignments:
        onehot, offs = _expert_onehot(topk_ids_ptr, start, num_assignments, expert_start, num_experts,
                                      CHUNK, EXPERTS_PAD)
        counts += tl.sum(onehot, 0)
        start += CHUNK
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    padded_ends = tl.cumsum(padded, 0)
    padded_starts = padded_ends - padded
    start = 0
    while start < sorted_len:
        offs = start + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + offs, tl.zeros([CHUNK], dtype=tl.int32) + num_assignments, mask=offs < sorted_len)
        start += CHUNK
    start = 0
    while start < num_blocks:
        blocks = start + tl.arange(0, CHUNK)
        # Experts past num_experts have padded_end = total, so a block at or past the total counts all of them.
        expert = tl.sum((padded_ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blocks, tl.where(expert < num_experts, expert, -1), mask=blocks < num_blocks)
        start += CHUNK
    tl.debug_barrier()  # the sentinel fill above must land before the scatter below overwrites it
    running = tl.zeros([EXPERTS_PAD], dtype=tl.int32)
    start = 0
    while start < num_assignments:
        running = _align_scatter_chunk(sorted_ids_ptr, topk_ids_ptr, start, running, padded_starts,
                                       num_assignments, expert_start, num_experts, CHUNK, EXPERTS_PAD)
        start += CHUNK


@triton.jit
def _block_coords(num_m_blocks, num_n_blocks, GROUP_M: tl.constexpr):
    """(m block, n block) of this program, walking GROUP_M row blocks per column sweep so that the weight slices
    a group reads stay in L2 across its row blocks."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _gate_up_step(k, x_ptrs, wg_ptrs, row_ok, n_ok, acc_gate, acc_up, offs_k, gate_to_up, size_k,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """One BLOCK_K step of x @ [gate; up].T for a row block (k = step index)."""
    shift = k * BLOCK_K
    if EVEN_K:
        k_ok = offs_k < BLOCK_K
    else:
        k_ok = offs_k < size_k - shift
    x = tl.load(x_ptrs + shift, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
    w_mask = k_ok[:, None] & n_ok[None, :]
    w_gate = tl.load(wg_ptrs + shift, mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
    w_up = tl.load(wg_ptrs + gate_to_up + shift, mask=w_mask, other=0.0)
    return dot_acc(x, w_gate, acc_gate, DOT_F32, PRECISION), dot_acc(x, w_up, acc_up, DOT_F32, PRECISION)


@triton.jit(do_not_specialize=["num_assignments", "num_m_blocks"])  # step sizes: one compile per config
def moe_gate_up_kernel(
    x_ptr, w13_ptr, act_ptr, sorted_ids_ptr, block_expert_ptr,
    num_assignments, top_k, ffn, hidden, num_m_blocks,
    stride_xt, stride_we, stride_wn, stride_at,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """act[a, n] = silu(x[t] . gate_e[n]) * (x[t] . up_e[n]) for the rows a of one sorted block (t = a // top_k)."""
    pid_m, pid_n = _block_coords(num_m_blocks, tl.cdiv(ffn, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return  # a spare block past the padded total
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] assignment ids
    row_ok = ids < num_assignments
    tokens = (ids // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < ffn
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]
    wg_ptrs = w13_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    gate_to_up = ffn * stride_wn  # rows [gate; up]: up row n is gate row n + ffn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    steps = tl.cdiv(hidden, BLOCK_K)
    if WHILE_LOOP:
        k = 0
        while k < steps:
            acc_gate, acc_up = _gate_up_step(k, x_ptrs, wg_ptrs, row_ok, n_ok, acc_gate, acc_up, offs_k, gate_to_up,
                                             hidden, BLOCK_K, EVEN_K, DOT_F32, PRECISION)
            k += 1
    else:
        for k in range(0, steps):
            acc_gate, acc_up = _gate_up_step(k, x_ptrs, wg_ptrs, row_ok, n_ok, acc_gate, acc_up, offs_k, gate_to_up,
                                             hidden, BLOCK_K, EVEN_K, DOT_F32, PRECISION)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SiLU-GLU epilogue, in fp32
    out_ptrs = act_ptr + ids[:, None].to(tl.int64) * stride_at + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_step(k, a_ptrs, w_ptrs, row_ok, n_ok, acc, offs_k, size_k,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """One BLOCK_K step of act @ down_e.T for a row block."""
    shift = k * BLOCK_K
    if EVEN_K:
        k_ok = offs_k < BLOCK_K
    else:
        k_ok = offs_k < size_k - shift
    a = tl.load(a_ptrs + shift, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
    w = tl.load(w_ptrs + shift, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
    return dot_acc(a, w, acc, DOT_F32, PRECISION)


@triton.jit(do_not_specialize=["num_assignments", "num_m_blocks"])  # step sizes: one compile per config
def moe_down_kernel(
    act_ptr, w2_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, block_expert_ptr,
    num_assignments, hidden, ffn, num_m_blocks,
    stride_at, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """out[a, n] = topk_weight[a] * (act[a] . down_e[n]) in fp32, for the rows a of one sorted block."""
    pid_m, pid_n = _block_coords(num_m_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = ids < num_assignments
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + ids[:, None].to(tl.int64) * stride_at + offs_k[None, :]
    w_ptrs = w2_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    steps = tl.cdiv(ffn, BLOCK_K)
    if WHILE_LOOP:
        k = 0
        while k < steps:
            acc = _down_step(k, a_ptrs, w_ptrs, row_ok, n_ok, acc, offs_k, ffn, BLOCK_K, EVEN_K, DOT_F32, PRECISION)
            k += 1
    else:
        for k in range(0, steps):
            acc = _down_step(k, a_ptrs, w_ptrs, row_ok, n_ok, acc, offs_k, ffn, BLOCK_K, EVEN_K, DOT_F32, PRECISION)
    weight = tl.load(topk_weights_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_sum_kernel(
    part_ptr, out_ptr, topk_ids_ptr, top_k, hidden, expert_start, num_experts, stride_ot,
    TOP_K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[t] = sum over the local choices k of part[t * top_k + k] (grid: tokens x hidden blocks); the rows of
    choices routed to other ranks were never written and are skipped."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    choices = tl.arange(0, TOP_K_PAD)
    ids = tl.load(topk_ids_ptr + token * top_k + choices, mask=choices < top_k, other=-1).to(tl.int32)
    local = (choices < top_k) & (ids >= expert_start) & (ids < expert_start + num_experts)
    rows = token * top_k + choices
    part = tl.load(part_ptr + rows[:, None] * hidden + offs[None, :],
                   mask=local[:, None] & (offs < hidden)[None, :], other=0.0)  # [TOP_K_PAD, BLOCK] fp32
    tl.store(out_ptr + token * stride_ot + offs, tl.sum(part, 0).to(out_ptr.dtype.element_ty), mask=offs < hidden)
