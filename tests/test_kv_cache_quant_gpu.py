"""INT8 and FP8 KV cache on a real GPU: compiled kernels (the interpreter-checked ones of
test_kv_cache_quant_kernels.py also run compiled when collected with a GPU), the write and decode attention captured
in a CUDA graph and replayed, tiny engines giving the same greedy tokens with graphs, eagerly and on the CPU, and the
8-bit cache's decode not slower than the bf16 one at a long context."""

from __future__ import annotations

import pytest
import torch

import kiln
from fixtures_runtime import PROMPTS
from kiln.kernels import reference
from kiln.quant.kv_cache import KVScales, quantize
from fixtures_kv_cache import FORMATS, calib_text, convert_build, tiny_hf_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CACHE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}


def _decode_case(fmt: str, seqs: int, context: int, heads: int = 32, kv_heads: int = 32, head_dim: int = 128,
                 block: int = 16, dtype: torch.dtype = torch.bfloat16):
    """A decode batch over a cache of `fmt` (or bf16 when fmt is None) with random contents."""
    width = -(-context // block)
    blocks = seqs * width
    scales = KVScales.from_scales(torch.full((kv_heads,), 4.0 / QMAX[fmt or "int8"], device="cuda"),
                                  torch.full((kv_heads,), 3.0 / QMAX[fmt or "int8"], device="cuda"))
    raw = torch.randn(2, blocks * block, kv_heads, head_dim, device="cuda")
    if fmt is None:
        k_cache, v_cache = (raw[i].to(dtype).view(blocks, block, kv_heads, head_dim) for i in range(2))
        scales = None
    else:
        k_cache = quantize(raw[0], scales.k_inv, CACHE_DTYPES[fmt]).view(blocks, block, kv_heads, head_dim)
        v_cache = quantize(raw[1], scales.v_inv, CACHE_DTYPES[fmt]).view(blocks, block, kv_heads, head_dim)
    tables = torch.randperm(blocks, device="cuda").to(torch.int32).view(seqs, width)
    query = torch.randn(seqs, heads, head_dim, dtype=dtype, device="cuda")
    starts = torch.arange(seqs + 1, dtype=torch.int32, device="cuda")
    lens = torch.full((seqs,), context, dtype=torch.int32, device="cuda")
    return query, k_cache, v_cache, tables, starts, lens, scales


@pytest.mark.parametrize("fmt", sorted(CACHE_DTYPES))
def test_quantized_decode_in_a_graph_matches_reference(fmt):
    from kiln.kernels import triton_ops

    query, k_cache, v_cache, tables, starts, lens, scales = _decode_case(fmt, 8, 1000, heads=48, kv_heads=8)
    key = torch.randn(8, 8, 128, dtype=torch.bfloat16, device="cuda")
    slots = (tables[:, -1].long() * 16 + 5)  # a slot in each sequence's last block

    def step() -> torch.Tensor:
        triton_ops.write_kv_cache(key, key, k_cache, v_cache, slots, scales)
        return triton_ops.paged_attention(query, k_cache, v_cache, tables, starts, lens, 128**-0.5, None,
                                          max_query_len=1, max_seq_len=2048, kv_scales=scales)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        query.normal_()
        graph.replay()
        ref = reference.paged_attention(query, k_cache, v_cache, tables, starts, lens, 128**-0.5, kv_scales=scales)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_engine_graphs_match_eager_and_cpu(fmt, tmp_path):
    model_dir = tiny_hf_dir(tmp_path, "mpt")
    engine = convert_build(tmp_path / fmt, model_dir, FORMATS[fmt], "--calib_dataset", str(calib_text(tmp_path)),
                           "--calib_size", "6", "--calib_max_seq_length", "24")
    params = kiln.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    gpu = kiln.LLM(engine, device="cuda", kernel_backend="triton")
    assert gpu.runner.graphs is not None
    with_graphs = [r.outputs[0].token_ids for r in gpu.generate(PROMPTS, params)]
    gpu.runner.graphs = None
    eager = [r.outputs[0].token_ids for r in gpu.generate(PROMPTS, params)]
    cpu = [r.outputs[0].token_ids for r in kiln.LLM(engine, device="cpu").generate(PROMPTS, params)]
    assert with_graphs == eager == cpu


def _time_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@pytest.mark.parametrize("fmt", sorted(CACHE_DTYPES))
def test_quantized_decode_attention_is_faster_than_bf16(fmt):
    """Batch 8 at a 4096-token context (MPT-7B's attention shape): the 8-bit cache reads half the bytes."""
    from kiln.kernels import triton_ops

    times = {}
    for name in (None, fmt):
        query, k_cache, v_cache, tables, starts, lens, scales = _decode_case(name, 8, 4096)
        times[name] = _time_ms(lambda: triton_ops.paged_attention(
            query, k_cache, v_cache, tables, starts, lens, 128**-0.5, None, max_query_len=1, max_seq_len=4096,
            kv_scales=scales))
    print(f"decode attention, batch 8 x 4096: bf16 {times[None]:.3f} ms, {fmt} {times[fmt]:.3f} ms")
    assert times[fmt] < times[None]
