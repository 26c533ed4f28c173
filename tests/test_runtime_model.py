"""The runtime with a real model: batch invariance under continuous batching (requests arriving mid-generation,
chunked prefill, preemption forced by a tiny KV cache) and prefix caching that skips work without changing outputs.

Tiny DBRX (MoE, RoPE, GQA) and MPT (ALiBi) in fp32; each prompt's greedy tokens alone are the reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln
from fixtures_runtime import BLOCK, PROMPTS, build_small_step_engine, tiny_checkpoint
from kiln.engine.sequence import Sequence

NEW_TOKENS = 20
GREEDY = kiln.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["dbrx", "mpt"])
def engine(request, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp(request.param)
    return build_small_step_engine(tmp, tiny_checkpoint(tmp, request.param))


def alone(engine_dir: Path) -> list[list[int]]:
    llm = kiln.LLM(engine_dir)
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


def tiny_cache_llm(engine_dir: Path, blocks: int, prefix_caching: bool = True) -> kiln.LLM:
    probe = kiln.LLM(engine_dir)
    block_bytes = probe.runner.plan.kv_bytes_per_token * BLOCK
    llm = kiln.LLM(engine_dir, kv_cache_bytes=blocks * block_bytes, enable_prefix_caching=prefix_caching)
    assert llm.runner.num_blocks == blocks
    return llm


def test_batch_invariance_with_arrivals_chunking_and_preemption(engine):
    """Two requests start; the others arrive while they decode, two at a time. 14 blocks hold at most two
    finished sequences (7 blocks each at most), so the scheduler must preempt and recompute."""
    reference = alone(engine)
    llm = tiny_cache_llm(engine, blocks=14)
    eng = llm.engine
    got: dict[int, list[int]] = {}
    pending = list(enumerate(PROMPTS))

    def arrive(count: int) -> None:
        for _ in range(min(count, len(pending))):
            index, prompt = pending.pop(0)
            eng.add(Sequence(index, prompt, NEW_TOKENS, ignore_eos=True, params=GREEDY))
            got[index] = []

    arrive(2)
    steps = 0
    while eng.has_unfinished() or pending:
        for event in eng.step():
            got[event.seq.seq_id].append(event.token_id)
        steps += 1
        if steps % 3 == 0:
            arrive(2)
        assert steps < 2000, "the engine stopped making progress"
    assert eng.scheduler.num_preemptions > 0, "the tiny cache was meant to force preemption"
    assert [got[i] for i in range(len(PROMPTS))] == reference
    assert eng.scheduler.block_manager.num_free_blocks == 14  # every block came back


def count_computed_tokens(llm: kiln.LLM) -> list[int]:
    """Wrap the executor so each step's computed (new) tokens are counted (`execute` launches too)."""
    counts: list[int] = []
    launch = llm.runner.launch

    def counting(output, feed=None):
        counts.append(sum(item.num_new_tokens for item in output.scheduled))
        return launch(output, feed)

    llm.engine.executor.launch = counting
    return counts


def test_prefix_caching_skips_shared_blocks_and_changes_nothing(engine):
    """A 12-token system prompt (3 full blocks) shared by four requests: with prefix caching, the three that come
    after the first skip exactly those 12 tokens each."""
    system = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    prompts = [system + [20 + i, 30 + i, 40 + i, 50 + i, 60 + i] for i in range(4)]
    runs = {}
    for caching in (True, False):
        llm = kiln.LLM(engine, enable_prefix_caching=caching)
        counts = count_computed_tokens(llm)
        first = llm.generate(prompts[:1], GREEDY)
        rest = llm.generate(prompts[1:], GREEDY)
        runs[caching] = ([o.outputs[0].token_ids for o in first + rest], sum(counts))
    (cached_out, cached_work), (plain_out, plain_work) = runs[True], runs[False]
    assert cached_out == plain_out
    assert plain_work - cached_work == 3 * len(system)
    # Without caching, each request computes its prompt and all but its last output token.
    assert plain_work == sum(len(p) + NEW_TOKENS - 1 for p in prompts)
