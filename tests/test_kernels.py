"""kiln's Triton kernels against the torch references: on the CPU through Triton's interpreter, or compiled on a GPU.

Triton reads TRITON_INTERPRET when @triton.jit decorates a function, and decorates its own library (tl.sum, tl.cdiv,
...) when triton is first imported; an interpreted kernel cannot call a compiled library function, so the mode is
one per process. Without a GPU this module sets TRITON_INTERPRET=1 (setdefault); on the CPU no Triton kernel can run
any other way, so nothing else changes. If triton was imported earlier in this pytest process (torch._dynamo imports
it when transformers loads), tests/interpreted_triton.py re-runs triton's library module and kiln's kernel modules
under the interpreter. With a GPU the environment is left alone and the same checks run compiled on CUDA tensors,
so tests/test_kernels_gpu.py, collected in the same process, gets compiled kernels.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

import pytest  # noqa: E402

from interpreted_triton import interpret_triton  # noqa: E402

_KERNEL_MODULES = (
    "kiln.kernels.triton_jit_common",
    "kiln.kernels.triton_attention_kernels", "kiln.kernels.triton_moe_kernels", "kiln.kernels.triton_kv_cache",
    "kiln.kernels.triton_attention", "kiln.kernels.triton_moe", "kiln.kernels.triton_norm", "kiln.kernels.triton_ops",
    # triton_ops imports the weight-only fused MoE, which shares device functions with the weight-only matmul
    "kiln.kernels.triton_gemv_kernels", "kiln.kernels.triton_gemv", "kiln.kernels.triton_weight_only_kernels",
    "kiln.kernels.triton_weight_only",
    "kiln.kernels.triton_moe_weight_only_kernels", "kiln.kernels.triton_moe_weight_only",
)


if INTERPRET:
    interpret_triton(_KERNEL_MODULES)

from kiln.kernels import KernelSet, reference  # noqa: E402
from kiln.kernels import triton_attention as attention  # noqa: E402
from kiln.kernels import triton_moe as moe  # noqa: E402
from kiln.kernels import triton_norm  # noqa: E402
from kiln.kernels import triton_ops as ops  # noqa: E402

TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 2e-2)}


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi slopes as MPT/Baichuan define them (Press et al.), including head counts that are not powers of 2."""
    closest = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (i + 1) / closest) for i in range(2 * (heads - closest))][::2]
    return torch.tensor(slopes + extra[: heads - closest], dtype=torch.float32, device=DEVICE)


# ---- KV cache write ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float16)])
def test_write_kv_cache_matches_reference_and_skips_negative_slots(dtype, cache_dtype):
    tokens, kv_heads, head_dim, blocks, block_size = 11, 3, 8, 6, 4
    qkv = torch.randn(tokens, 5, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    key, value = qkv[:, 1], qkv[:, 3]  # strided views, as a split of a fused projection gives
    slots = torch.randperm(blocks * block_size, device=DEVICE)[:tokens]
    slots[[2, 7]] = -1
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, device=DEVICE).to(cache_dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    ops.write_kv_cache(key, value, k_cache, v_cache, slots.to(torch.int32))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_cache_rejects_mismatched_cache():
    key = torch.randn(4, 2, 8, device=DEVICE)
    cache3, cache2 = torch.zeros(2, 4, 3, 8, device=DEVICE), torch.zeros(2, 4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="kv heads"):
        ops.write_kv_cache(key, key, cache3, cache3, torch.arange(4, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        ops.write_kv_cache(key, key, cache2, cache2, torch.arange(4.0, device=DEVICE))


# ---- paged attention -----------------------------------------------------------------------------------------------


def make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, dtype, block_size=16):
    """A packed batch whose sequences own randomly permuted (non-contiguous, out of order) cache blocks."""
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 1
    num_blocks = len(seq_lens) * max_blocks + 2
    block_tables = torch.randperm(num_blocks)[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(sum(q_lens), heads, head_dim).to(dtype)
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (query, k_cache, v_cache, block_tables.to(torch.int32), starts, lens))


def run_attention(q_lens, seq_lens, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, alibi=False, **kwargs):
    query, k_cache, v_cache, tables, starts, lens = make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, dtype)
    run_attention_on(query, k_cache, v_cache, tables, starts, lens, alibi_slopes(heads) if alibi else None, **kwargs)


def run_attention_on(query, k_cache, v_cache, tables, starts, lens, slopes=None, **kwargs):
    scale = query.shape[2] ** -0.5
    out = ops.paged_attention(query, k_cache, v_cache, tables, starts, lens, scale, slopes, **kwargs)
    ref = reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, scale, slopes)
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_prefill(dtype):
    run_attention([37, 9], [37, 9], dtype=dtype)


def test_attention_chunked_prefill_spanning_blocks():
    run_attention([13, 20], [50, 61], heads=6, kv_heads=3, head_dim=32)


def test_attention_decode_batch():
    run_attention([1, 1, 1, 1], [1, 16, 17, 70], heads=8, kv_heads=8, head_dim=16, max_query_len=1)


def test_attention_mixed_batch_with_empty_sequence():
    run_attention([1, 24, 0, 6, 1], [40, 24, 5, 30, 3], heads=8, kv_heads=2, head_dim=16)


@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (12, 4)])
def test_attention_gqa(heads, kv_heads):
    run_attention([5, 1, 18], [21, 33, 18], heads=heads, kv_heads=kv_heads, head_dim=16)


@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (40, 40), (6, 2)])
def test_attention_alibi_non_power_of_two_heads(heads, kv_heads):
    run_attention([9, 1], [30, 20], heads=heads, kv_heads=kv_heads, head_dim=16, alibi=True)


@pytest.mark.parametrize("head_dim", [8, 24])
def test_attention_head_dim_padded(head_dim):
    run_attention([7, 1], [19, 35], head_dim=head_dim, dtype=torch.float16)


@pytest.mark.parametrize("num_splits,alibi", [(3, False), (5, True)])
def test_attention_split_k_decode(num_splits, alibi):
    # Splits empty for the short sequences exercise the merge's handling of partitions with no keys.
    run_attention([1, 1, 1], [150, 9, 77], heads=6, kv_heads=2, alibi=alibi, num_splits=num_splits)


def test_attention_split_k_chosen_for_long_decode_context():
    assert attention.choose_num_splits(2, 4096, DEVICE, decode=True) > 1
    assert attention.choose_num_splits(2, 4096, DEVICE, decode=False) == 1
    assert attention.choose_num_splits(2, 100, DEVICE, decode=True) == 1
    run_attention([1], [600], heads=2, kv_heads=1, head_dim=16, dtype=torch.bfloat16, max_seq_len=600)


def test_attention_split_k_with_multi_token_queries():
    run_attention([4, 1], [90, 40], heads=4, kv_heads=2, num_splits=2)


# Small tiles so that tiny contexts give many splits: 32 keys per split, 16 per step.
SMALL_SPLITS = attention.AttentionConfig(16, 16, 4, 1, keys_per_split=32)


@pytest.mark.parametrize("heads,kv_heads,alibi", [(2, 2, True), (12, 2, True)])
def test_attention_fused_split_short_and_empty_splits(heads, kv_heads, alibi):
    # A 5-split grid: lengths 1 and 20 use one split (direct write), 33 two, 90 three, 160 all five; the others
    # return at once and the merge reads only the used ones. Group 6 as DBRX; ALiBi as MPT.
    run_attention([1] * 5, [1, 20, 33, 90, 160], heads=heads, kv_heads=kv_heads, alibi=alibi, num_splits=5,
                  max_query_len=1, config=SMALL_SPLITS)


def test_attention_fused_split_deterministic_and_counters_reset():
    query, k_cache, v_cache, tables, starts, lens = make_batch([1] * 3, [70, 5, 40], 6, 2, 16, torch.float32)
    run = lambda: ops.paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.25, max_query_len=1,  # noqa
                                      num_splits=4, config=SMALL_SPLITS)
    first = run()
    counters = attention._COUNTERS[query.device]
    assert counters.abs().sum().item() == 0  # every (sequence, kv head) counter was reset by its last split
    assert torch.equal(first, run())
    assert_close(first, reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.25))


def test_attention_graph_padding_rows_and_multi_token_tiles():
    # As a CUDA graph's padded batch: rows past the real ones have one query token, seq_len 1 and a zero block
    # table row (their KV write was skipped), in a grid split for a 256-token bound.
    query, k_cache, v_cache, tables, starts, lens = make_batch([1] * 5, [70, 3, 100, 1, 1], 4, 2, 16, torch.float32)
    tables[3:] = 0
    run_attention_on(query, k_cache, v_cache, tables, starts, lens, max_query_len=1, max_seq_len=256,
                     config=SMALL_SPLITS)
    # Several new tokens per sequence in one tile (max_query_len <= BLOCK_Q), split and fused.
    run_attention([3, 1, 2], [60, 40, 2], heads=2, kv_heads=2, alibi=True, max_query_len=3, num_splits=4,
                  config=attention.AttentionConfig(64, 16, 4, 1, keys_per_split=16))


def test_attention_two_kernel_merge_fallback():
    config = attention.AttentionConfig(16, 16, 4, 1, keys_per_split=32, fused_merge=False)
    run_attention([1, 1, 1], [100, 9, 50], heads=6, kv_heads=2, alibi=True, num_splits=4, config=config)


def test_attention_launch_table():
    key = attention.attention_key(True, 128, 6, 32, 2048)
    assert key == attention.AttentionKey("decode", 128, 8, 32, 2048)
    assert attention.attention_key(True, 128, 1, 33, 5000) == attention.AttentionKey("decode", 128, 1, 256, 1 << 30)
    assert attention.attention_config(True, 128, 6, 1, 2048).block_m == 16
    assert attention.attention_config(False, 128, 32, 4, 512).block_m == 128
    tuned = attention.AttentionConfig(16, 32, 8, 3, keys_per_split=64)
    old = attention._TUNED_CONFIGS.get(key)
    attention.register_attention_config(key, tuned)
    try:
        assert attention.attention_config(True, 128, 6, 20, 1500) == tuned
    finally:
        if old is None:
            attention._TUNED_CONFIGS.pop(key)
        else:
            attention._TUNED_CONFIGS[key] = old
    with pytest.raises(ValueError, match="keys_per_split"):
        attention.AttentionConfig(16, 64, 4, 2, keys_per_split=100)
    with pytest.raises(ValueError, match="head_dim"):
        attention.register_attention_config(attention.AttentionKey("decode", 96, 1, 1, 256), tuned)
    # Fused merge: the grid's split count comes from the config's keys per split and the context bound only.
    assert attention.choose_num_splits(1, 2048, DEVICE, True, keys_per_split=256) == 8
    assert attention.choose_num_splits(1, 300, DEVICE, True, keys_per_split=256) == 1


def test_attention_rejects_bad_inputs():
    query, k_cache, v_cache, tables, starts, lens = make_batch([3], [3], 6, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        ops.paged_attention(query, k_cache, v_cache, tables, starts, lens, 1.0)
    query, k_cache, v_cache, tables, starts, lens = make_batch([3], [3], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="block_tables"):
        ops.paged_attention(query, k_cache, v_cache, tables.float(), starts, lens, 1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        ops.paged_attention(query, k_cache, v_cache, tables, starts, lens, 1.0, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="query_start_loc"):
        ops.paged_attention(query, k_cache, v_cache, tables, starts[:1], lens, 1.0)
    big, big_cache = torch.zeros(1, 2, 512, device=DEVICE), torch.zeros(1, 16, 2, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        ops.paged_attention(big, big_cache, big_cache, tables, starts, lens, 1.0)


# ---- fused MoE -------------------------------------------------------------------------------------------------------


def make_moe(tokens, size, ffn, local_experts, total_experts, top_k, dtype, unused=()):
    hidden = torch.randn(tokens, size).to(dtype)
    w13 = (torch.randn(local_experts, 2 * ffn, size) * size**-0.5).to(dtype)
    w2 = (torch.randn(local_experts, size, ffn) * ffn**-0.5).to(dtype)
    logits = torch.randn(tokens, total_experts)
    logits[:, list(unused)] = -float("inf")  # experts that receive no tokens
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return tuple(t.to(DEVICE) for t in (hidden, w13, w2, weights, ids))


@pytest.mark.parametrize("top_k,dtype", [(2, torch.float32), (4, torch.float32), (2, torch.bfloat16),
                                         (4, torch.float16)])
def test_fused_moe_matches_reference(top_k, dtype):
    hidden, w13, w2, weights, ids = make_moe(19, 32, 48, 8, 8, top_k, dtype, unused=(2, 6))
    assert_close(ops.fused_moe(hidden, w13, w2, weights, ids), reference.fused_moe(hidden, w13, w2, weights, ids))


def test_fused_moe_odd_sizes_and_several_blocks_per_expert():
    hidden, w13, w2, weights, ids = make_moe(70, 40, 24, 3, 3, 2, torch.float32)
    config = moe.MoeConfig(16, 2, moe.GemmTile(16, 32, 4, 2), moe.GemmTile(32, 16, 4, 2))
    out = ops.fused_moe(hidden, w13, w2, weights, ids.to(torch.int32), config=config)
    assert_close(out, reference.fused_moe(hidden, w13, w2, weights, ids))


def test_fused_moe_expert_parallel_ranks_add_up():
    hidden, w13, w2, weights, ids = make_moe(12, 32, 32, 8, 8, 4, torch.float32)
    parts = []
    for start in (0, 4):
        local13, local2 = w13[start : start + 4], w2[start : start + 4]
        part = ops.fused_moe(hidden, local13, local2, weights, ids, expert_start=start)
        assert_close(part, reference.fused_moe(hidden, local13, local2, weights, ids, expert_start=start))
        parts.append(part)
    assert_close(parts[0] + parts[1], reference.fused_moe(hidden, w13, w2, weights, ids))


def test_align_routing_sorts_by_expert_with_padding():
    ids = torch.tensor([[1, 0], [1, 2], [5, 1], [0, 3]], device=DEVICE)  # expert 5 lives on another rank
    routing = moe.align_routing(ids, num_experts=4, expert_start=0, block_m=16)
    sentinel = ids.numel()
    rows = routing.sorted_ids.view(-1, 16)
    assert routing.block_expert.tolist() == [0, 1, 2, 3]
    assert [r[r < sentinel].tolist() for r in rows] == [[1, 6], [0, 2, 5], [3], [7]]
    routing = moe.align_routing(ids, num_experts=2, expert_start=2, block_m=16)  # local experts 2, 3
    assert routing.block_expert.tolist()[:2] == [0, 1] and all(e == -1 for e in routing.block_expert.tolist()[2:])
    assert routing.sorted_ids[:16].tolist().count(3) == 1 and routing.sorted_ids[16:32].tolist().count(7) == 1


def test_fused_moe_config_table_and_tuning_default_on_cpu():
    config = moe.tune_fused_moe(8, 32, 32, 4, 2, device="cpu")  # on the CPU: the default, untimed
    assert config == moe.default_moe_config(8, 2, 4)
    assert moe.default_moe_config(2048, 4, 16).block_m > moe.default_moe_config(1, 4, 16).block_m
    custom = moe.MoeConfig(32, 1, moe.GemmTile(16, 16, 4, 2), moe.GemmTile(16, 16, 4, 2))
    kernel_set = ops.triton_kernels({moe.moe_config_key(5, 32, 32, 4): custom})
    assert moe.lookup_moe_config(7, 32, 32, 4, 2) == custom  # 5 and 7 tokens share the bucket 8
    assert isinstance(kernel_set, KernelSet) and kernel_set.name == "triton"
    hidden, w13, w2, weights, ids = make_moe(7, 32, 32, 4, 4, 2, torch.float32)
    out = kernel_set.fused_moe(hidden, w13, w2, weights, ids)
    assert_close(out, reference.fused_moe(hidden, w13, w2, weights, ids))


def test_fused_moe_rejects_bad_inputs():
    hidden, w13, w2, weights, ids = make_moe(4, 32, 48, 2, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="w2"):
        ops.fused_moe(hidden, w13, w2.transpose(1, 2).contiguous(), weights, ids)
    with pytest.raises(ValueError, match="dtype"):
        ops.fused_moe(hidden, w13.half(), w2, weights, ids)
    with pytest.raises(ValueError, match="expert_start"):
        ops.fused_moe(hidden, w13, w2, weights, ids, expert_start=-1)


def test_align_routing_many_chunks_is_a_stable_sort():
    ids = torch.randint(0, 12, (300, 3), device=DEVICE)  # 900 assignments: several of the kernel's chunks
    routing = moe.align_routing(ids, num_experts=8, expert_start=2, block_m=32)
    sorted_ids, experts = routing.sorted_ids.view(-1, 32).cpu(), routing.block_expert.cpu()
    flat = ids.flatten().cpu() - 2
    used = experts >= 0
    got = torch.cat([row[row < flat.numel()] for row in sorted_ids[used]])
    local = torch.nonzero((flat >= 0) & (flat < 8)).flatten()
    want = local[torch.sort(flat[local], stable=True).indices]
    assert torch.equal(got.long(), want)
    assert all((flat[row[row < flat.numel()].long()] == e).all() for row, e in zip(sorted_ids[used], experts[used]))
    assert experts[used].tolist() == sorted(experts[used].tolist()) and not used[used.sum():].any()


# ---- residual add + LayerNorm / RMSNorm -----------------------------------------------------------------------


def make_norm_inputs(tokens, dim, dtype, bias):
    x = torch.randn(tokens, dim, dtype=dtype, device=DEVICE) * 3 + 1  # an offset mean: centring matters
    residual = torch.randn(tokens, dim, dtype=dtype, device=DEVICE)
    weight = (torch.rand(dim, device=DEVICE) + 0.5).to(dtype)
    b = torch.randn(dim, dtype=dtype, device=DEVICE) if bias else None
    return x, residual, weight, b


@pytest.mark.parametrize("rms,bias,with_residual,dim,dtype", [
    (False, True, True, 48, torch.float32), (False, False, True, 37, torch.bfloat16),
    (False, True, False, 100, torch.float16), (True, False, True, 80, torch.float32),
    (True, False, True, 19, torch.bfloat16), (True, False, False, 64, torch.float16)])
def test_add_norm_matches_reference(rms, bias, with_residual, dim, dtype):
    x, residual, weight, b = make_norm_inputs(5, dim, dtype, bias)
    residual = residual if with_residual else None
    out, summed = triton_norm.add_norm(x, residual, weight, b, 1e-5, rms)
    ref_out, ref_summed = reference.add_norm(x, residual, weight, b, 1e-5, rms)
    if INTERPRET and dtype == torch.bfloat16:
        # Triton 3.6's interpreter casts float32 to bfloat16 by truncation, not round-to-nearest: one ulp apart.
        torch.testing.assert_close(summed.float(), ref_summed.float(), rtol=2**-7, atol=0)
    else:  # the sum is rounded once to the dtype, exactly as torch's add rounds it
        assert torch.equal(summed, ref_summed)
    assert_close(out, ref_out)


def test_add_norm_reference_is_the_unfused_block():
    """reference.add_norm is `x + residual` then the norm modules' own math (float64 check of the LayerNorm)."""
    x, residual, weight, b = make_norm_inputs(3, 24, torch.float32, True)
    out, summed = reference.add_norm(x, residual, weight, b, 1e-5, False)
    s = (x + residual).double()
    want = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out.double(), want * weight.double() + b.double(), rtol=1e-5, atol=1e-5)
    rms_out, _ = reference.add_norm(x, residual, weight, None, 1e-6, True)
    want = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    torch.testing.assert_close(rms_out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(summed, x + residual)


def test_add_norm_rejects_bad_inputs():
    x, residual, weight, b = make_norm_inputs(2, 16, torch.float32, True)
    with pytest.raises(ValueError, match="residual"):
        triton_norm.add_norm(x, residual[:, :8], weight, b, 1e-5, False)
    with pytest.raises(ValueError, match="dtype"):
        triton_norm.add_norm(x, residual.half(), weight, b, 1e-5, False)
    with pytest.raises(ValueError, match="weight"):
        triton_norm.add_norm(x, residual, weight[:8], b, 1e-5, False)
    with pytest.raises(ValueError, match="no bias"):
        triton_norm.add_norm(x, residual, weight, b, 1e-5, True)
    with pytest.raises(ValueError, match="2 dimensions"):
        triton_norm.add_norm(x[0], None, weight, b, 1e-5, False)
    with pytest.raises(ValueError, match="eps"):
        triton_norm.add_norm(x, None, weight, b, 0.0, False)
