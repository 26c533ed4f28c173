"""Multi-rank engines on two GPUs (NCCL) against one GPU: tp 2 for MPT and ep 2 for DBRX on the tiny fp32
checkpoints (identical greedy tokens, logits close), and tp 2 / ep 2 of real-width dummy engines (an MPT-7B-shaped
and a DBRX slice, bf16: logits within bf16 noise of one GPU); decode CUDA graphs captured on both ranks giving the
tokens of eager decoding at tp 2 and ep 2; KILN_MULTIRANK_ASYNC=1 (steps launched ahead, the sampled ids broadcast
over NCCL feeding both ranks' decode graphs) giving the tokens of the same engine with it off. Run on the lent 2-GPU
machine; skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kiln
import kiln.llm
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from kiln.cli.main import main as kiln_main
from kiln.engine.sequence import Sequence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                  reason="needs 2 CUDA GPUs")]

PROMPTS = [[5, 17, 33, 2, 99, 150, 7], [250, 3], list(range(40, 61)), [42]]
GREEDY = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def build(tmp: Path, source: list[str], *extra: str) -> Path:
    assert kiln_main(["convert", *source, "--output_dir", str(tmp / "ckpt"), *extra]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp / "ckpt"), "--output_dir", str(tmp / "engine"),
                      "--max_batch_size", "8", "--max_input_len", "64", "--max_seq_len", "128",
                      "--no_tune"]) == 0  # tile tuning (minutes per engine) is tested elsewhere; equality is not about it
    return tmp / "engine"


def outputs(engine: Path) -> tuple[list[list[int]], list[torch.Tensor]]:
    with kiln.LLM(engine, device="cuda", kv_cache_free_gpu_memory_fraction=0.3) as llm:
        tokens = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY)]
        scores = [llm.score(p).cpu() for p in PROMPTS[:3]]
    return tokens, scores


def max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def tiny_sources(tmp: Path, family: str) -> list[str]:
    if family == "mpt":
        cfg = mpt_published_config()
        return ["--model_dir", str(save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, tmp / "hf"))]
    model_dir, _, _ = make_dbrx_checkpoint(tmp)
    return ["--model_dir", str(model_dir)]


@pytest.mark.parametrize("family,extra", [("mpt", ("--tp_size", "2")), ("dbrx", ("--tp_size", "2", "--moe_tp_mode", "1"))],
                         ids=["mpt-tp2", "dbrx-ep2"])
def test_tiny_two_gpus_equal_one(tmp_path, family, extra):
    source = tiny_sources(tmp_path, family)
    ref_tokens, ref_scores = outputs(build(tmp_path / "one", source))
    tokens, scores = outputs(build(tmp_path / "two", source, *extra))
    assert tokens == ref_tokens
    for ours, ref in zip(scores, ref_scores):
        assert max_rel(ours, ref) < 1e-3


@pytest.mark.parametrize("preset,extra", [("mpt-7b", ("--tp_size", "2")), ("dbrx", ("--tp_size", "2", "--moe_tp_mode", "1"))],
                         ids=["mpt7b-tp2", "dbrx-slice-ep2"])
def test_full_width_two_gpus_close_to_one(tmp_path, preset, extra):
    source = ["--preset", preset, "--num_layers", "2", "--dtype", "bfloat16", "--dummy_device", "cuda"]
    _, ref_scores = outputs(build(tmp_path / "one", source))
    _, scores = outputs(build(tmp_path / "two", source, *extra))
    for ours, ref in zip(scores, ref_scores):
        assert max_rel(ours, ref) < 3e-2  # bf16: the all-reduce adds partial sums in another order


def graph_tokens(engine: Path, graphs: bool) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens (batches of 1 to 4 decoding together) with decode graphs on every rank or on none, and the
    decode batch sizes the driver replayed."""
    # the cache config reaches every spawned rank: graphs are on or off for all of them
    with kiln.LLM(engine, device="cuda", kv_cache_free_gpu_memory_fraction=0.3, use_cuda_graphs=graphs) as llm:
        runner, replays = llm.runner, []
        assert (runner.graphs is not None) == graphs
        if graphs:
            run = runner.graphs.run
            runner.graphs.run = lambda batch: (replays.append(batch.num_seqs), run(batch))[1]
        tokens = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY)]
        tokens += [r.outputs[0].token_ids for r in llm.generate(PROMPTS[:1], GREEDY)]
    return tokens, replays


@pytest.mark.parametrize("family,extra", [("mpt", ("--tp_size", "2")), ("dbrx", ("--tp_size", "2", "--moe_tp_mode", "1"))],
                         ids=["mpt-tp2", "dbrx-ep2"])
def test_graphs_on_two_gpus_equal_eager(tmp_path, family, extra):
    engine = build(tmp_path / "two", tiny_sources(tmp_path, family), *extra)
    with_graphs, replays = graph_tokens(engine, True)
    eager, _ = graph_tokens(engine, False)
    assert with_graphs == eager
    assert 4 in replays and 1 in replays  # every decode step of both generate calls replayed a graph
    assert len(replays) == 2 * (GREEDY.max_tokens - 1)


def async_run(engine: Path, async_on: bool, monkeypatch) -> tuple[list[list[int]], int, int]:
    """Greedy tokens with KILN_MULTIRANK_ASYNC on or off (graphs on every rank), requests arriving while others
    decode; and how many decode graph replays took a feed, how many steps were launched ahead."""
    monkeypatch.setenv("KILN_MULTIRANK_ASYNC", "1" if async_on else "0")
    with kiln.LLM(engine, device="cuda", kv_cache_free_gpu_memory_fraction=0.3) as llm:
        runner, fed = llm.runner, []
        assert runner.graphs is not None and runner.can_launch_ahead is async_on
        run = runner.graphs.run
        runner.graphs.run = lambda batch, feed=None: (fed.append(feed is not None), run(batch, feed))[1]
        eng, got = llm.engine, {}
        for i, prompt in enumerate(PROMPTS):  # one more request every other step
            eng.add(Sequence(i, prompt, GREEDY.max_tokens, ignore_eos=True, params=GREEDY))
            got[i] = []
            for _ in range(2):
                for ev in eng.step():
                    got[ev.seq.seq_id].append(ev.token_id)
        while eng.has_unfinished():
            for ev in eng.step():
                got[ev.seq.seq_id].append(ev.token_id)
        return [got[i] for i in range(len(PROMPTS))], sum(fed), eng.num_launched_ahead


@pytest.mark.parametrize("family,extra", [("mpt", ("--tp_size", "2")), ("dbrx", ("--tp_size", "2", "--moe_tp_mode", "1"))],
                         ids=["mpt-tp2", "dbrx-ep2"])
def test_async_on_two_gpus_equals_sync(tmp_path, monkeypatch, family, extra):
    """KILN_MULTIRANK_ASYNC=1 over NCCL: the sampled ids broadcast from the driver feed the next step's decode
    graphs on both ranks, and the tokens are those of the same engine run one step at a time."""
    engine = build(tmp_path / "two", tiny_sources(tmp_path, family), *extra)
    sync_tokens, sync_fed, sync_ahead = async_run(engine, False, monkeypatch)
    tokens, fed, ahead = async_run(engine, True, monkeypatch)
    assert tokens == sync_tokens
    assert sync_fed == sync_ahead == 0
    assert fed > 4 and ahead > 8
