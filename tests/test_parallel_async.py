"""Async scheduling over several ranks (KILN_MULTIRANK_ASYNC=1, gloo on the CPU, fp32): the driver launches step N+1
before N's tokens reach the host, every rank takes N's sampled ids from the driver's broadcast, and the results are
exactly those of the same engine with the switch off. DBRX tp 2 and ep 2, MPT tp 2 and MPT pp 2 (every step of
several sequences run as micro-batches, so feeds are split between them); requests arriving mid-generation, chunked
prefill (a 6-token step budget), preemption (a small cache), greedy and seeded sampling with logprobs, then beam
search. Without spawning ranks: how a plan resends placeholders and how a feed is split between micro-batches."""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln
from fixtures_runtime import BLOCK, PROMPTS, build_small_step_engine, tiny_checkpoint
from kiln.checkpoint.kiln_format import load_artifact
from kiln.config import ConfigError
from kiln.engine.scheduler import ScheduledSeq, SchedulerOutput, StepFeed
from kiln.engine.sequence import Sequence
from kiln.executor.multirank import MULTIRANK_ASYNC_ENV, multirank_async
from kiln.executor.step_plan import PlanDecoder, PlanEncoder
from kiln.executor.worker import split_feed, split_output

REQUESTS = [
    (PROMPTS[0], kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)),
    (PROMPTS[1], kiln.SamplingParams(max_tokens=7, temperature=0.9, top_k=40, seed=7, logprobs=1, ignore_eos=True)),
    (PROMPTS[2], kiln.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)),
    (PROMPTS[3], kiln.SamplingParams(max_tokens=7, temperature=1.1, top_p=0.9, seed=3, ignore_eos=True)),
    (PROMPTS[4], kiln.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=0)),
    (PROMPTS[5], kiln.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)),
]
BEAMS = kiln.SamplingParams(max_tokens=3, num_beams=2, n=2, ignore_eos=True)


def build(tmp: Path, model_dir: Path, *extra: str) -> Path:
    return build_small_step_engine(tmp, model_dir, "--dtype", "float32", *extra, max_seq_len=32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("async_sources")
    return {family: tiny_checkpoint(tmp / family, family) for family in ("dbrx", "mpt")}


def drive(llm: kiln.LLM) -> dict[int, list[tuple]]:
    """Two requests start, the others arrive two every 3 steps; then a beam request. Returns each request's events
    (token, logprob, top logprobs, finished) and, under -1, the beams."""
    eng, pending, got, steps = llm.engine, list(enumerate(REQUESTS)), {}, 0

    def arrive(count: int) -> None:
        for _ in range(min(count, len(pending))):
            i, (prompt, params) = pending.pop(0)
            eng.add(Sequence(i, prompt, params.max_tokens, frozenset(), params.ignore_eos, params.min_tokens, params))
            got[i] = []

    arrive(2)
    while eng.has_unfinished() or pending:
        for ev in eng.step():
            got[ev.seq.seq_id].append((ev.token_id, ev.logprob, ev.top_logprobs, ev.finished))
        steps += 1
        if steps % 3 == 0:
            arrive(2)
        assert steps < 500, "the engine stopped making progress"
    beams = llm.generate([PROMPTS[0]], BEAMS)[0].outputs
    got[-1] = [(o.token_ids, o.cumulative_logprob) for o in beams]
    return got


def run(engine: Path, async_on: bool, monkeypatch, cache_blocks: int) -> tuple[dict[int, list[tuple]], dict]:
    monkeypatch.setenv(MULTIRANK_ASYNC_ENV, "1" if async_on else "0")
    per_token = load_artifact(engine, "engine").raw["memory_plan"]["kv_bytes_per_token"]
    with kiln.LLM(engine, device="cpu", kv_cache_bytes=cache_blocks * BLOCK * per_token) as llm:
        assert llm.engine.async_scheduling is async_on and llm.runner.can_launch_ahead is async_on
        events = drive(llm)
        runner = llm.runner
        counts = {"ahead": llm.engine.num_launched_ahead, "fed": runner.fed_steps, "shared": runner.shared_steps,
                  "micro": runner.micro_batched_steps, "preempted": llm.engine.scheduler.num_preemptions}
        bm = llm.engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_step_in_flight
    return events, counts


def assert_same(ours: dict[int, list[tuple]], ref: dict[int, list[tuple]]) -> None:
    assert ours.keys() == ref.keys()
    assert [t for t, _ in ours[-1]] == [t for t, _ in ref[-1]]  # beams
    assert [s for _, s in ours[-1]] == pytest.approx([s for _, s in ref[-1]], abs=1e-4)
    for i in range(len(REQUESTS)):
        assert [e[0] for e in ours[i]] == [e[0] for e in ref[i]], f"request {i}: tokens differ"
        assert [e[3] for e in ours[i]] == [e[3] for e in ref[i]]
        assert [e[1] for e in ours[i]] == pytest.approx([e[1] for e in ref[i]], abs=1e-5)
        assert [[t for t, _ in e[2]] for e in ours[i]] == [[t for t, _ in e[2]] for e in ref[i]]
    assert [len(ours[i]) for i in range(len(REQUESTS))] == [p.max_tokens for _, p in REQUESTS]


@pytest.mark.parametrize("family,extra", [
    ("dbrx", ("--tp_size", "2")),
    ("dbrx", ("--tp_size", "2", "--moe_tp_mode", "1")),  # ep 2
    ("mpt", ("--tp_size", "2")),
    ("mpt", ("--tp_size", "2", "--pp_size", "2")),  # rank 1 is a first-stage worker: it applies feeds too
], ids=["dbrx-tp2", "dbrx-ep2", "mpt-tp2", "mpt-tp2xpp2"])
def test_async_equals_sync(tmp_path, sources, monkeypatch, family, extra):
    pipeline = "--pp_size" in extra
    if pipeline:  # every step of several sequences runs as micro-batches: feeds are split between them
        monkeypatch.setenv("KILN_PP_MICROBATCH_MIN_TOKENS", "0")
    engine = build(tmp_path, sources[family], *extra)
    ref, ref_counts = run(engine, False, monkeypatch, cache_blocks=9)
    ours, counts = run(engine, True, monkeypatch, cache_blocks=9)
    assert_same(ours, ref)
    # the synchronous engine shares nothing; the async one launched most steps ahead, fed from the broadcast ids
    assert ref_counts["ahead"] == ref_counts["fed"] == ref_counts["shared"] == 0
    assert counts["ahead"] > 8 and counts["fed"] > 8 and counts["shared"] > counts["fed"]
    assert counts["preempted"] > 0 and ref_counts["preempted"] > 0
    assert (counts["micro"] > 10) == pipeline


def seq_step(seq: Sequence, new: int) -> SchedulerOutput:
    return SchedulerOutput([ScheduledSeq(seq, new)], [], [], new)


def test_placeholders_are_sent_again_once_real():
    """A plan launched ahead sends the placeholder (the worker needs a token there) and the next plan overwrites it
    with the real token, so the worker's mirror ends up equal to the driver's sequence."""
    encoder, decoder = PlanEncoder(), PlanDecoder()
    seq = Sequence(0, [5, 6, 7], max_tokens=8)
    decoder.decode(encoder.encode(seq_step(seq, 3), False))
    seq.num_computed_tokens = 3
    seq.token_ids.append(0)  # step 1 in flight: a placeholder at index 3
    plan = encoder.encode(seq_step(seq, 1), False, placeholders={0: 3})
    assert [(u.new_tokens, u.at) for u in plan.seqs] == [([0], 3)]
    decoder.decode(plan)
    seq.token_ids[3] = 41  # step 1's token arrives; step 2's placeholder follows
    seq.num_computed_tokens = 4
    seq.token_ids.append(0)
    plan = encoder.encode(seq_step(seq, 1), False, placeholders={0: 4})
    assert [(u.new_tokens, u.at) for u in plan.seqs] == [([41, 0], 3)]
    mirror = decoder.decode(plan).scheduled[0].seq
    seq.token_ids[4] = 42
    seq.num_computed_tokens = 5
    decoder.decode(encoder.encode(seq_step(seq, 1), False))  # a plain step: the rest is sent, nothing held back
    assert mirror.token_ids == seq.token_ids == [5, 6, 7, 41, 42]


def test_feed_is_split_between_micro_batches():
    seqs = [Sequence(i, list(range(1, 6)), max_tokens=4) for i in range(4)]
    output = SchedulerOutput([ScheduledSeq(s, n) for s, n in zip(seqs, (1, 4, 1, 1))], [], [], 7)
    parts = split_output(output, 2)
    assert [p.num_batched_tokens for p in parts] == [5, 2]
    feed = StepFeed("previous", [(0, 2), (5, 0), (6, 1)])
    split = split_feed(feed, parts)
    assert [f.tokens for f in split] == [[(0, 2)], [(0, 0), (1, 1)]]
    assert all(f.previous == "previous" for f in split)
    assert split_feed(None, parts) == [None, None] and split_feed(feed, parts[:1]) == [feed]


def test_switch(monkeypatch):
    for raw, on in (("", False), ("0", False), ("1", True)):
        monkeypatch.setenv(MULTIRANK_ASYNC_ENV, raw)
        assert multirank_async() is on
    monkeypatch.setenv(MULTIRANK_ASYNC_ENV, "yes")
    with pytest.raises(ConfigError, match="KILN_MULTIRANK_ASYNC must be 1"):
        multirank_async()
