"""kiln's Triton kernels on a real GPU: realistic DBRX / MPT / Baichuan shapes in fp16 and bf16, odd sizes, and
each kernel captured in a CUDA graph and replayed twice with changed inputs. Run on the lent H100/H200."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.kernels import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOLERANCES = {torch.float16: (2e-3, 3e-3), torch.bfloat16: (1.6e-2, 2e-2), torch.float32: (1e-5, 1e-4)}


def ops():
    from kiln.kernels import triton_ops  # imported in the test: CPU collection must not depend on it

    return triton_ops


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def alibi_slopes(heads: int) -> torch.Tensor:
    closest = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (i + 1) / closest) for i in range(2 * (heads - closest))][::2]
    return torch.tensor(slopes + extra[: heads - closest], dtype=torch.float32, device="cuda")


# ---- KV write ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,kv_heads,head_dim,dtype", [(517, 8, 128, torch.bfloat16), (64, 32, 128, torch.float16),
                                                            (33, 3, 80, torch.bfloat16)])
def test_write_kv_cache_realistic(tokens, kv_heads, head_dim, dtype):
    blocks, block_size = tokens // 16 + 8, 16
    key = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device="cuda")
    value = torch.randn_like(key)
    slots = torch.randperm(blocks * block_size, device="cuda")[:tokens]
    slots[::7] = -1
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    ops().write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ---- attention -----------------------------------------------------------------------------------------------------


def make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, dtype, block_size=16, extra_blocks=1):
    max_blocks = max(-(-s // block_size) for s in seq_lens) + extra_blocks
    num_blocks = len(seq_lens) * max_blocks + 3
    tables = torch.randperm(num_blocks, device="cuda")[: len(seq_lens) * max_blocks].view(len(seq_lens), -1)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda").to(dtype)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(sum(q_lens), heads, head_dim, device="cuda").to(dtype)
    starts = torch.tensor([0] + list(q_lens), device="cuda").cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return query, k_cache, v_cache, tables.to(torch.int32).contiguous(), starts, lens


CASES = {
    "mpt7b_decode_alibi": dict(q=[1] * 16, s=[1 + 131 * i for i in range(16)], h=32, kv=32, d=128, alibi=True),
    "dbrx_decode_gqa_long": dict(q=[1] * 4, s=[4000, 2500, 33, 1200], h=48, kv=8, d=128, alibi=False),
    "dbrx_prefill_gqa": dict(q=[512, 300, 77], s=[512, 300, 77], h=48, kv=8, d=128, alibi=False),
    "baichuan13b_prefill_alibi": dict(q=[333, 129], s=[333, 129], h=40, kv=40, d=128, alibi=True),
    "chunked_mixed": dict(q=[1, 200, 1, 64], s=[900, 456, 17, 64], h=32, kv=8, d=128, alibi=False),
    "odd_head_dim_80": dict(q=[50, 1], s=[80, 300], h=12, kv=4, d=80, alibi=True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_realistic(case, dtype):
    c = CASES[case]
    query, k_cache, v_cache, tables, starts, lens = make_batch(c["q"], c["s"], c["h"], c["kv"], c["d"], dtype)
    slopes = alibi_slopes(c["h"]) if c["alibi"] else None
    scale = c["d"] ** -0.5
    out = ops().paged_attention(query, k_cache, v_cache, tables, starts, lens, scale, slopes)
    assert_close(out, reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, scale, slopes))


@pytest.mark.parametrize("num_splits", [2, 7, 16])
def test_paged_attention_split_k(num_splits):
    query, k_cache, v_cache, tables, starts, lens = make_batch([1] * 3, [3000, 100, 1777], 32, 4, 128, torch.bfloat16)
    out = ops().paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.088, num_splits=num_splits)
    assert_close(out, reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.088))


def test_paged_attention_block_size_32_and_fp32():
    query, k_cache, v_cache, tables, starts, lens = make_batch([7, 1], [70, 500], 8, 2, 64, torch.float32, 32)
    out = ops().paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.125, alibi_slopes(8))
    assert_close(out, reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.125, alibi_slopes(8)))


# ---- fused MoE -----------------------------------------------------------------------------------------------------


def make_moe(tokens, size, ffn, experts, top_k, dtype, total_experts=None):
    hidden = torch.randn(tokens, size, device="cuda").to(dtype)
    w13 = (torch.randn(experts, 2 * ffn, size, device="cuda") * size**-0.5).to(dtype)
    w2 = (torch.randn(experts, size, ffn, device="cuda") * ffn**-0.5).to(dtype)
    logits = torch.randn(tokens, total_experts or experts, device="cuda")
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return hidden, w13, w2, weights, ids


def check_moe(hidden, w13, w2, weights, ids, expert_start=0):
    out = ops().fused_moe(hidden, w13, w2, weights, ids, expert_start)
    exact = reference.fused_moe(hidden.float(), w13.float(), w2.float(), weights, ids, expert_start)
    assert out.dtype == hidden.dtype and torch.isfinite(out).all()
    assert relative_error(out, exact) < 1.5e-2


@pytest.mark.parametrize("tokens", [1, 8, 64, 513])
def test_fused_moe_dbrx_tp8_shard(tokens):
    check_moe(*make_moe(tokens, 6144, 1344, 16, 4, torch.bfloat16))


@pytest.mark.parametrize("tokens,dtype", [(3, torch.float16), (200, torch.bfloat16)])
def test_fused_moe_odd_sizes_and_expert_parallel(tokens, dtype):
    hidden, w13, w2, weights, ids = make_moe(tokens, 1000, 700, 4, 2, dtype, total_experts=10)
    check_moe(hidden, w13, w2, weights, ids, expert_start=3)


# ---- CUDA graphs ---------------------------------------------------------------------------------------------------


def capture(fn):
    """Warm up (compile) on a side stream, then capture `fn` in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def test_graph_write_kv_cache():
    key = torch.randn(40, 8, 128, dtype=torch.bfloat16, device="cuda")
    value = torch.randn_like(key)
    slots = torch.randperm(64 * 16, device="cuda")[:40]
    k_cache = torch.zeros(64, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    graph, _ = capture(lambda: ops().write_kv_cache(key, value, k_cache, v_cache, slots))
    for _ in range(2):
        key.normal_(), value.normal_()
        slots.copy_(torch.randperm(64 * 16, device="cuda")[:40])
        slots[::5] = -1
        k_cache.normal_(), v_cache.normal_()
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        graph.replay()
        reference.write_kv_cache(key, value, k_ref, v_ref, slots)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_graph_paged_attention_decode():
    batch = 8
    query, k_cache, v_cache, tables, starts, lens = make_batch([1] * batch, [2048] * batch, 32, 32, 128,
                                                               torch.bfloat16)
    slopes = alibi_slopes(32)
    graph, out = capture(lambda: ops().paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.088, slopes))
    for _ in range(2):
        query.normal_(), k_cache.normal_(), v_cache.normal_()
        lens.copy_(torch.randint(1, 2049, (batch,), device="cuda", dtype=torch.int32))
        tables.copy_(tables[torch.randperm(batch, device="cuda")])
        graph.replay()
        assert_close(out, reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.088, slopes))


SPLIT_SHAPES = {"mpt7b": (32, 32, True), "dbrx": (48, 8, False)}


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("model", list(SPLIT_SHAPES))
def test_graph_paged_attention_fused_split(model, batch):
    """Decode at the engine's bound (max_seq_len 4096: a split grid) captured once and replayed with short,
    mixed and padded contexts: sequences use only the splits their length fills, the last split merges in the
    same kernel, padding rows (seq_len 1, table row 0) stay finite, replays are bitwise reproducible, and every
    split counter is back at 0 after each replay."""
    from kiln.kernels import triton_attention

    heads, kv_heads, use_alibi = SPLIT_SHAPES[model]
    query, k_cache, v_cache, tables, starts, lens = make_batch([1] * batch, [4096] * batch, heads, kv_heads, 128,
                                                               torch.bfloat16)
    slopes = alibi_slopes(heads) if use_alibi else None
    run = lambda: ops().paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.088, slopes,  # noqa: E731
                                        max_query_len=1, max_seq_len=4096)
    graph, out = capture(run)
    for contexts in ([160] * batch, [1 + (4095 * i) // max(batch - 1, 1) for i in range(batch)]):
        query.normal_()
        lens.copy_(torch.tensor(contexts, dtype=torch.int32, device="cuda"))
        if batch > 1:
            lens[-batch // 4:] = 1  # padding rows of a graph: one key, block table row 0
            tables[-batch // 4:] = 0
        graph.replay()
        first = out.clone()
        graph.replay()
        assert torch.equal(out, first)
        assert_close(out, reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.088, slopes))
        assert int(triton_attention._COUNTERS[query.device].abs().sum()) == 0


def test_fused_split_merge_is_race_free():
    """Many launches of a wide split grid (DBRX batch 32, 16 splits, every split used): any visibility race between
    a split's partial and the merging program would show as a result differing from the two-kernel merge's or
    from run to run."""
    from kiln.kernels.triton_attention import AttentionConfig

    query, k_cache, v_cache, tables, starts, lens = make_batch([1] * 32, [4096] * 32, 48, 8, 128, torch.bfloat16)
    fused = AttentionConfig(16, 64, 4, 2, keys_per_split=256)
    two_kernel = AttentionConfig(16, 64, 4, 2, keys_per_split=256, fused_merge=False)
    args = (query, k_cache, v_cache, tables, starts, lens, 0.088)
    want = ops().paged_attention(*args, max_query_len=1, num_splits=16, config=two_kernel)
    first = ops().paged_attention(*args, max_query_len=1, num_splits=16, config=fused)
    torch.testing.assert_close(first.float(), want.float(), rtol=1e-2, atol=1e-2)  # merge order differs
    for _ in range(50):
        assert torch.equal(ops().paged_attention(*args, max_query_len=1, num_splits=16, config=fused), first)


def test_graph_paged_attention_two_kernel_fallback():
    from kiln.kernels.triton_attention import AttentionConfig

    query, k_cache, v_cache, tables, starts, lens = make_batch([1] * 8, [2048] * 8, 48, 8, 128, torch.float16)
    config = AttentionConfig(16, 64, 4, 2, keys_per_split=256, fused_merge=False)
    graph, out = capture(lambda: ops().paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.088,
                                                       max_query_len=1, max_seq_len=2048, config=config))
    for _ in range(2):
        query.normal_()
        lens.copy_(torch.randint(1, 2049, (8,), device="cuda", dtype=torch.int32))
        graph.replay()
        assert_close(out, reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, 0.088))


def test_graph_fused_moe():
    hidden, w13, w2, weights, ids = make_moe(16, 2048, 1024, 16, 4, torch.bfloat16)
    graph, out = capture(lambda: ops().fused_moe(hidden, w13, w2, weights, ids))
    for _ in range(2):
        hidden.normal_()
        new_weights, new_ids = torch.softmax(torch.randn(16, 16, device="cuda"), -1).topk(4, dim=-1)
        weights.copy_(new_weights), ids.copy_(new_ids)
        graph.replay()
        exact = reference.fused_moe(hidden.float(), w13.float(), w2.float(), weights, ids)
        assert relative_error(out, exact) < 1.5e-2


@pytest.mark.parametrize("dim,rms,dtype", [(4096, False, torch.bfloat16), (6144, False, torch.float16),
                                           (5120, True, torch.bfloat16), (4099, True, torch.float32)])
def test_add_norm_realistic(dim, rms, dtype):
    for tokens in (1, 37, 2048):
        x = torch.randn(tokens, dim, dtype=dtype, device="cuda") * 4
        residual = torch.randn_like(x)
        weight = (torch.rand(dim, device="cuda") + 0.5).to(dtype)
        bias = None if rms else torch.randn(dim, dtype=dtype, device="cuda")
        out, summed = ops().add_norm(x, residual, weight, bias, 1e-5, rms)
        ref_out, ref_summed = reference.add_norm(x, residual, weight, bias, 1e-5, rms)
        assert torch.equal(summed, ref_summed)
        assert_close(out, ref_out)


def test_graph_add_norm():
    x = torch.randn(8, 4096, dtype=torch.bfloat16, device="cuda")
    residual, weight = torch.randn_like(x), torch.rand(4096, dtype=torch.bfloat16, device="cuda") + 0.5
    graph, (out, summed) = capture(lambda: ops().add_norm(x, residual, weight, None, 1e-5, False))
    for _ in range(2):
        x.normal_(), residual.normal_()
        graph.replay()
        ref_out, ref_summed = reference.add_norm(x, residual, weight, None, 1e-5, False)
        assert torch.equal(summed, ref_summed)
        assert_close(out, ref_out)
