"""CUDA graphs for decode on a real GPU: the KV write and decode attention captured with padded rows and replayed
with new contents; the tiny DBRX, MPT and Baichuan engines giving the same greedy tokens with graphs as eagerly
and as on the CPU in fp32, in batches of mixed lengths where requests join mid-generation."""

from __future__ import annotations

import gc

import random

import pytest
import torch

import kiln
from kiln.kernels import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# ---- kernels in a graph with padded rows ---------------------------------------------------------------------------


def _fill(static: dict[str, torch.Tensor], lens: list[int], tables: torch.Tensor, slots: torch.Tensor,
          q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write a decode batch of len(lens) real rows into the static buffers; the other rows are padding."""
    n = len(lens)
    static["seq_lens"].fill_(1)
    static["seq_lens"][:n] = torch.tensor(lens, dtype=torch.int32)
    static["slots"].fill_(-1)
    static["slots"][:n] = slots
    static["tables"].zero_()
    static["tables"][:n, : tables.shape[1]] = tables
    static["q"].normal_()
    static["q"][:n], static["k"][:n], static["v"][:n] = q, k, v


@pytest.mark.parametrize("heads,kv_heads,alibi,dtype", [(48, 8, False, torch.bfloat16), (32, 32, True, torch.float16),
                                                         (6, 2, True, torch.float32)])
def test_decode_kernels_in_a_graph_with_padding(heads, kv_heads, alibi, dtype):
    from kiln.kernels import triton_attention, triton_ops

    torch.manual_seed(0)
    padded, block_size, max_seq_len, head_dim = 8, 16, 2048, 128
    width = max_seq_len // block_size
    blocks = padded * width + 3
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    slopes = torch.rand(heads, device="cuda") if alibi else None
    static = {"q": torch.zeros(padded, heads, head_dim, dtype=dtype, device="cuda"),
              "k": torch.zeros(padded, kv_heads, head_dim, dtype=dtype, device="cuda"),
              "v": torch.zeros(padded, kv_heads, head_dim, dtype=dtype, device="cuda"),
              "seq_lens": torch.ones(padded, dtype=torch.int32, device="cuda"),
              "slots": torch.full((padded,), -1, dtype=torch.int64, device="cuda"),
              "tables": torch.zeros(padded, width, dtype=torch.int32, device="cuda"),
              "starts": torch.arange(padded + 1, dtype=torch.int32, device="cuda")}

    def step() -> torch.Tensor:
        triton_ops.write_kv_cache(static["k"], static["v"], k_cache, v_cache, static["slots"])
        return triton_ops.paged_attention(static["q"], k_cache, v_cache, static["tables"], static["starts"],
                                          static["seq_lens"], head_dim**-0.5, slopes, max_query_len=1,
                                          max_seq_len=max_seq_len)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    perm = torch.randperm(blocks, device="cuda")
    for lens in ([5, 300, 2048, 17, 1000], [2047, 1, 129]):  # contexts from 1 key to max_seq_len, 3-5 of 8 rows
        n = len(lens)
        tables = perm[: n * width].view(n, width).to(torch.int32)
        pos = torch.tensor(lens, device="cuda") - 1
        slots = tables[torch.arange(n, device="cuda"), pos // block_size].long() * block_size + pos % block_size
        q = torch.randn(n, heads, head_dim, dtype=dtype, device="cuda")
        k = torch.randn(n, kv_heads, head_dim, dtype=dtype, device="cuda")
        v = torch.randn_like(k)
        k_want, v_want = k_cache.clone(), v_cache.clone()
        reference.write_kv_cache(k, v, k_want, v_want, slots)
        _fill(static, lens, tables, slots, q, k, v)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)  # padding rows wrote nothing
        starts = torch.arange(n + 1, dtype=torch.int32, device="cuda")
        want = reference.paged_attention(q, k_cache, v_cache, tables, starts, static["seq_lens"][:n].clone(),
                                         head_dim**-0.5, slopes)
        tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(out[:n].float(), want.float(), rtol=tol, atol=tol)
        assert torch.isfinite(out).all()  # padding rows too
        counters = triton_attention._COUNTERS.get(k_cache.device)
        assert counters is None or int(counters.abs().sum()) == 0  # the fused split merge reset its counters


# ---- tiny models: graphs vs eager vs CPU ---------------------------------------------------------------------------


def _no_tune_flag() -> list[str]:
    """`--no_tune` where `kiln build` has it: timing MoE tiles on the GPU says nothing about graphs."""
    import argparse

    from kiln.cli import build_cmd

    parser = argparse.ArgumentParser()
    build_cmd.add_arguments(parser)
    _, unknown = parser.parse_known_args(["--checkpoint_dir", "x", "--no_tune"])
    return [] if unknown else ["--no_tune"]


def _build(tmp, model_dir, *convert_flags: str):
    from kiln.cli.main import main

    ckpt, engine = tmp / "ckpt", tmp / "engine"
    assert main(["convert", "--model_dir", str(model_dir), "--output_dir", str(ckpt), "--dtype", "float32",
                 *convert_flags]) == 0
    assert main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), "--max_batch_size", "6",
                 "--max_input_len", "48", "--max_seq_len", "96", *_no_tune_flag()]) == 0
    return engine


def _dbrx(tmp):
    from fixtures_dbrx import make_dbrx_checkpoint

    return _build(tmp, make_dbrx_checkpoint(tmp)[0])


def _mpt(tmp):
    from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint

    cfg = mpt_published_config(attn_config={"clip_qkv": 0.5})
    return _build(tmp, save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf"))


def _baichuan(version: str):
    def make(tmp):
        from fixtures_baichuan import make_baichuan_checkpoint

        flags = [] if version == "v1_7b" else ["--model_version", version]
        return _build(tmp, make_baichuan_checkpoint(tmp, version)[0], *flags)

    return make


MODELS = {"dbrx": _dbrx, "mpt": _mpt, "baichuan_v2_7b": _baichuan("v2_7b"), "baichuan_v1_13b": _baichuan("v1_13b")}


def _requests(seed: int = 0) -> tuple[list[list[int]], list[kiln.SamplingParams]]:
    """Ten prompts of 1-40 tokens with 2-30 new tokens each: with max_batch_size 6, later requests join while
    earlier ones decode, and decode batches of 1-6 sequences replay padded graphs."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(1, 41))] for _ in range(10)]
    params = [kiln.SamplingParams(max_tokens=rng.randrange(2, 31), temperature=0.0, ignore_eos=True)
              for _ in range(10)]
    return prompts, params


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    """Each engine here takes 90% of free GPU memory for its KV cache and its graph wrapper forms a reference
    cycle: collect it after every test, so that tests run later in the same process (builds that tune kernels,
    other engines) find the memory free."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _tokens(llm: kiln.LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("name", list(MODELS))
def test_graphs_match_eager_and_cpu(name, tmp_path):
    engine = MODELS[name](tmp_path)
    prompts, params = _requests()
    gpu = kiln.LLM(engine, device="cuda", kernel_backend="triton")
    graphs = gpu.runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 6]
    replays: list[int] = []
    run = graphs.run
    graphs.run = lambda batch, *feed: (replays.append(batch.num_seqs), run(batch, *feed))[1]
    with_graphs = _tokens(gpu, prompts, params)
    assert len(replays) > 10 and set(replays) - {1, 2, 4, 6}  # batches padded to a larger graph too
    gpu.runner.graphs = None
    eager = _tokens(gpu, prompts, params)
    cpu = _tokens(kiln.LLM(engine, device="cpu"), prompts, params)
    assert with_graphs == eager == cpu
    assert [len(t) for t in with_graphs] == [p.max_tokens for p in params]
