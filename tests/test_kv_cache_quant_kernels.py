"""INT8 and FP8 KV cache in the kernels: the cache write's quantization and the attention's in-register
dequantization (prefill, chunked prefill, decode, split-K with both merges, GQA, ALiBi), Triton (on the CPU through
its interpreter, compiled on a GPU) against the torch reference, and the reference against an independent
quantize -> dequantize -> float attention. See tests/test_kernels.py for the interpreter setup."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

import pytest  # noqa: E402

from interpreted_triton import interpret_triton  # noqa: E402

if INTERPRET:
    interpret_triton(("kiln.kernels.triton_jit_common", "kiln.kernels.triton_attention_kernels",
                      "kiln.kernels.triton_kv_cache", "kiln.kernels.triton_attention", "kiln.kernels.triton_moe",
                      "kiln.kernels.triton_norm", "kiln.kernels.triton_ops"))

from kiln.kernels import reference  # noqa: E402
from kiln.kernels import triton_attention as attention  # noqa: E402
from kiln.kernels import triton_ops as ops  # noqa: E402
from kiln.quant.kv_cache import KVScales, dequantize, quantize  # noqa: E402

INT8, FP8 = torch.int8, torch.float8_e4m3fn
QMAX = {INT8: 127.0, FP8: 448.0}
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.6e-2, 2e-2)}


def scales_for(kv_heads: int, cache_dtype: torch.dtype, amax: float = 3.0) -> KVScales:
    """Different scales per head (a per-head calibration), chosen so that some values clip."""
    per_head = amax * (0.6 + 0.2 * torch.arange(kv_heads, dtype=torch.float32)) / QMAX[cache_dtype]
    return KVScales.from_scales(per_head.to(DEVICE), (1.3 * per_head).to(DEVICE))


def test_int8_quantize_is_round_half_even_and_clamped():
    inv = torch.ones(1)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.7, 300.0, -300.0]).view(-1, 1, 1)
    q = quantize(x, inv, INT8).flatten().tolist()
    assert q == [0, 2, 2, 0, -2, -2, 127, 127, -127]


def test_fp8_quantize_saturates_instead_of_nan():
    q = quantize(torch.tensor([1000.0, -1000.0, 0.3]).view(-1, 1, 1), torch.ones(1), FP8)
    assert q.float().flatten().tolist()[:2] == [448.0, -448.0] and torch.isfinite(q.float()).all()


@pytest.mark.parametrize("cache_dtype", [INT8, FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_quantized_kv_cache_matches_reference_exactly(cache_dtype, dtype):
    tokens, kv_heads, head_dim, blocks, block_size = 13, 3, 8, 6, 4
    qkv = torch.randn(tokens, 5, kv_heads, head_dim, device=DEVICE).mul(2.5).to(dtype)
    key, value = qkv[:, 1], qkv[:, 3]  # strided views, as the fused projection's split gives
    # Values on the rounding ties and at the e4m3 carry into the next power of two (31.9 -> 32), exactly.
    key[0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, 31.9]).to(dtype) * (3.0 * 0.6 / QMAX[cache_dtype])
    slots = torch.randperm(blocks * block_size, device=DEVICE)[:tokens]
    slots[[2, 7]] = -1
    scales = scales_for(kv_heads, cache_dtype)
    k_cache = torch.zeros(blocks, block_size, kv_heads, head_dim, device=DEVICE).to(cache_dtype)
    v_cache, k_ref, v_ref = k_cache.clone(), k_cache.clone(), k_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots, scales)
    ops.write_kv_cache(key, value, k_cache, v_cache, slots.to(torch.int32), scales)
    bits = lambda t: t.view(torch.int8)  # noqa: E731 - compare FP8 bit patterns
    assert torch.equal(bits(k_cache), bits(k_ref)) and torch.equal(bits(v_cache), bits(v_ref))
    assert (bits(k_ref) != 0).any() and (k_ref.float().abs() == QMAX[cache_dtype]).any()  # something stored, clipped


def test_fp8_write_covers_every_e4m3_value():
    # Every finite e4m3 value, and midpoints between neighbours (ties to even), written by the kernel as torch rounds.
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids + 1e-6, mids - 1e-6]).view(-1, 1, 1).to(DEVICE)
    cache = torch.zeros(x.shape[0], 1, 1, 1, device=DEVICE).to(FP8)
    scales = KVScales.from_scales(torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE))
    slots = torch.arange(x.shape[0], device=DEVICE)
    ops.write_kv_cache(x, x, cache, cache.clone(), slots, scales)
    assert torch.equal(cache.view(torch.int8).flatten(), x.to(FP8).view(torch.int8).flatten().to(DEVICE))


def test_kv_scales_must_match_the_cache():
    key = torch.randn(4, 2, 8, device=DEVICE)
    int8_cache = torch.zeros(2, 4, 2, 8, dtype=INT8, device=DEVICE)
    float_cache = torch.zeros(2, 4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="needs its layer's KVScales"):
        ops.write_kv_cache(key, key, int8_cache, int8_cache.clone(), torch.arange(4, device=DEVICE))
    with pytest.raises(ValueError, match="takes no KV scales"):
        ops.write_kv_cache(key, key, float_cache, float_cache.clone(), torch.arange(4, device=DEVICE),
                           scales_for(2, INT8))
    with pytest.raises(ValueError, match="k_scale must have shape"):
        ops.write_kv_cache(key, key, int8_cache, int8_cache.clone(), torch.arange(4, device=DEVICE),
                           scales_for(3, INT8))


def quantized_batch(q_lens, seq_lens, heads, kv_heads, head_dim, dtype, cache_dtype, block_size=16):
    """A packed batch over a quantized cache whose sequences own permuted blocks, and its scales."""
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 1
    num_blocks = len(seq_lens) * max_blocks + 2
    tables = torch.randperm(num_blocks)[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks)
    scales = scales_for(kv_heads, cache_dtype)
    raw = torch.randn(2, num_blocks * block_size, kv_heads, head_dim, device=DEVICE)
    k_cache = quantize(raw[0], scales.k_inv, cache_dtype).view(num_blocks, block_size, kv_heads, head_dim)
    v_cache = quantize(raw[1], scales.v_inv, cache_dtype).view(num_blocks, block_size, kv_heads, head_dim)
    query = torch.randn(sum(q_lens), heads, head_dim).to(dtype)
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return (query.to(DEVICE), k_cache, v_cache, tables.to(torch.int32).to(DEVICE), starts.to(DEVICE),
            lens.to(DEVICE), scales)


def run_quantized(q_lens, seq_lens, cache_dtype, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32,
                  alibi=False, **kwargs):
    query, k_cache, v_cache, tables, starts, lens, scales = quantized_batch(q_lens, seq_lens, heads, kv_heads,
                                                                            head_dim, dtype, cache_dtype)
    slopes = torch.linspace(0.5, 0.01, heads, device=DEVICE) if alibi else None
    scale = head_dim**-0.5
    out = ops.paged_attention(query, k_cache, v_cache, tables, starts, lens, scale, slopes, kv_scales=scales,
                              **kwargs)
    ref = reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, scale, slopes, kv_scales=scales)
    # Independent: dequantize the whole cache, then the float reference.
    k_float = dequantize(k_cache, scales.k_scale).to(dtype if dtype == torch.float32 else torch.float32)
    v_float = dequantize(v_cache, scales.v_scale).to(k_float.dtype)
    plain = reference.paged_attention(query.to(k_float.dtype), k_float, v_float, tables, starts, lens, scale, slopes)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(ref.float(), plain.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("cache_dtype", [INT8, FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_prefill_and_chunked_prefill(cache_dtype, dtype):
    run_quantized([37, 9], [37, 9], cache_dtype, dtype=dtype)  # prefill
    run_quantized([5, 3], [40, 20], cache_dtype, dtype=dtype, alibi=True)  # chunks after cached tokens


@pytest.mark.parametrize("cache_dtype", [INT8, FP8])
def test_attention_decode_gqa_alibi(cache_dtype):
    run_quantized([1, 1, 1], [33, 9, 70], cache_dtype, heads=6, kv_heads=2, alibi=True, max_query_len=1)


@pytest.mark.parametrize("cache_dtype", [INT8, FP8])
@pytest.mark.parametrize("fused", [True, False])
def test_attention_split_k_decode(cache_dtype, fused):
    # The V scale is applied to each split's partial before the merge: both merges must agree with one pass.
    config = attention.AttentionConfig(16, 16, 4, 1, keys_per_split=32, fused_merge=fused)
    run_quantized([1, 1, 1], [100, 9, 50], cache_dtype, heads=6, kv_heads=2, alibi=True, num_splits=4,
                  max_query_len=1, config=config)


def test_quantized_kernels_compile_for_hopper():
    """The interpreter runs the math, not the GPU's lowering: compile both kernels for sm_90 (Triton's bundled
    ptxas, no GPU needed) with an INT8 and an FP8 cache, split and unsplit."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "compile_kv_kernels.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(" ok ") == 6, done.stdout
