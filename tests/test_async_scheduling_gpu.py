"""Async scheduling on a real GPU: with decode CUDA graphs and eagerly, the engine gives the synchronous engine's
tokens and logprobs, placeholders are fed on the device (graph replays with a feed), and launching a step never
waits for the device: a step launched behind a long sleep kernel returns while the sleep still runs."""

from __future__ import annotations

import gc

import pytest
import torch

import kiln
from kiln.engine.sequence import Sequence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[5, 17, 33, 2, 99, 150, 7], [250, 3], list(range(11, 40)), [42], [7, 7, 8, 9, 100, 101, 102, 103, 104]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
    from kiln.cli.main import main

    tmp = tmp_path_factory.mktemp("async_gpu")
    cfg = mpt_published_config()
    model_dir = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf")
    assert main(["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp / "ckpt"), "--dtype",
                 "float32"]) == 0
    assert main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                 "--max_batch_size", "6", "--max_input_len", "48", "--max_seq_len", "96", "--no_tune"]) == 0
    return tmp / "engine"


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _params() -> list[kiln.SamplingParams]:
    return [kiln.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2),
            kiln.SamplingParams(max_tokens=12, temperature=0.8, top_k=30, top_p=0.9, seed=5, ignore_eos=True),
            kiln.SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
            kiln.SamplingParams(max_tokens=25, temperature=1.1, min_p=0.05, seed=9, ignore_eos=True),
            kiln.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)]


@pytest.mark.parametrize("graphs", [True, False])
def test_async_matches_sync_on_the_gpu(engine, graphs):
    results = {}
    for async_on in (False, True):
        llm = kiln.LLM(engine, device="cuda", kernel_backend="triton", use_cuda_graphs=graphs,
                       async_scheduling=async_on)
        assert (llm.runner.graphs is not None) is graphs
        fed_replays: list[int] = []
        if graphs:
            run = llm.runner.graphs.run
            llm.runner.graphs.run = lambda batch, *feed: (fed_replays.append(len(feed)), run(batch, *feed))[1]
        outs = llm.generate(PROMPTS, _params())
        results[async_on] = [(o.outputs[0].token_ids, o.outputs[0].token_logprobs) for o in outs]
        if graphs and async_on:
            assert sum(fed_replays) > 10  # decode steps replayed with placeholders fed on the device
        assert llm.engine.num_launched_ahead > (10 if async_on else -1)
        bm = llm.engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_step_in_flight
        del llm
        gc.collect()
    for (sync_ids, sync_lp), (async_ids, async_lp) in zip(results[False], results[True]):
        assert sync_ids == async_ids
        assert sync_lp == pytest.approx(async_lp, abs=1e-4)


@pytest.mark.parametrize("graphs", [True, False])
def test_launch_does_not_wait_for_the_device(engine, graphs):
    """Before each step() a ~50 ms sleep kernel is queued behind the step in flight; every step launched ahead
    must return while that sleep still runs (a synchronizing copy or .item() in the launch path would wait). The
    claim is for steady state: the same workload runs once first, so that every kernel is compiled and every
    device and pinned-host block size is cached (a first allocation of a new size may wait for the device; on an
    H200 one of 24 eager launches did when the warm-up ran a smaller batch)."""
    llm = kiln.LLM(engine, device="cuda", kernel_backend="triton", use_cuda_graphs=graphs)
    llm.generate(PROMPTS, _params())  # warm-up: the measured workload once
    marker = torch.cuda.Event()
    pending: list[bool] = []
    launch = llm.runner.launch

    shapes: list[str] = []

    def checked(output, feed=None):
        handle = launch(output, feed)
        if feed is not None:
            pending.append(not marker.query())
            prefill = sum(1 for item in output.scheduled if item.num_new_tokens > 1)
            shapes.append(f"{len(output.scheduled)} seqs/{prefill} prefilling")
        return handle

    llm.engine.executor.launch = checked
    eng = llm.engine
    for prompt, params in zip(PROMPTS, _params()):
        eng.add(Sequence(eng.new_seq_id(), prompt, params.max_tokens, ignore_eos=True, params=params))
    cycles = 100_000_000
    allocs = torch.cuda.host_memory_stats()["num_host_alloc"]  # page-locked allocations synchronize the device
    while eng.has_unfinished():
        torch.cuda._sleep(cycles)  # ~50 ms at 2 GHz
        marker.record()
        eng.step()
    waited = [f"launch {i} ({shapes[i]})" for i, ok in enumerate(pending) if not ok]
    grown = torch.cuda.host_memory_stats()["num_host_alloc"] - allocs
    assert len(pending) > 10 and all(pending), (f"{len(waited)} of {len(pending)} launches waited for the device: "
                                                f"{waited}; pinned blocks allocated meanwhile: {grown}")
