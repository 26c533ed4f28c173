"""Async scheduling (one step of lookahead): the engine launches step N+1 before it reads step N's tokens, and gives
exactly the synchronous engine's results. Tiny DBRX and MPT engines (fp32, CPU), each run with async on and off.

Covered: requests arriving mid-generation, chunked prefill (a 6-token step budget), preemption (a 14-block cache),
prefix caching, stop tokens finishing early, min_tokens, different max_tokens, seeded sampling, logprobs, top
logprobs and raw logits, a stop string (LLMEngine.finish, as LLM does) and an abort while a step is in flight,
penalties and multi-token bad words (their steps launch after the previous resolves), beam search (synchronous),
the call order that proves the lookahead, no step past max_tokens / max_model_len, and every block back at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kiln
from fixtures_runtime import BLOCK, PROMPTS, build_small_step_engine, tiny_checkpoint
from kiln.cli.main import main as kiln_main
from kiln.engine.llm_engine import BeamEvent, LLMEngine, needs_host_tokens
from kiln.engine.scheduler import SchedulerOutput, StepFeed
from kiln.engine.sequence import FinishReason, Sequence

MAX_LEN = 48


def greedy(max_tokens: int, **kw) -> kiln.SamplingParams:
    return kiln.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.fixture(scope="module", params=["dbrx", "mpt"])
def engine(request, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp(request.param)
    return build_small_step_engine(tmp, tiny_checkpoint(tmp, request.param), max_seq_len=MAX_LEN)


def make_llm(engine_dir: Path, async_on: bool, blocks: int | None = None) -> kiln.LLM:
    probe = kiln.LLM(engine_dir, async_scheduling=False)
    cache = None if blocks is None else blocks * probe.runner.plan.kv_bytes_per_token * BLOCK
    llm = kiln.LLM(engine_dir, kv_cache_bytes=cache, async_scheduling=async_on)
    assert llm.engine.async_scheduling is async_on
    return llm


def assert_idle(llm: kiln.LLM) -> None:
    """Nothing left: no request, no step in flight, no per-request state, every block free."""
    eng = llm.engine
    assert not eng.has_unfinished() and not eng.has_step_in_flight
    assert llm.runner.generators == {}
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


class Recorder:
    """An executor around the model runner that records launches and result reads, in order, and checks that no
    step computes a token past its sequence's limits (the last token is sampled, never computed)."""

    can_launch_ahead = True

    def __init__(self, runner, max_model_len: int) -> None:
        self.runner, self.max_model_len = runner, max_model_len
        self.calls: list[tuple[str, int]] = []
        self.feeds: list[tuple[SchedulerOutput, StepFeed | None]] = []

    def launch(self, output: SchedulerOutput, feed: StepFeed | None = None):
        step = sum(1 for kind, _ in self.calls if kind == "launch")
        for item in output.scheduled:
            seq = item.seq
            limit = min(seq.num_prompt_tokens + seq.max_tokens, self.max_model_len) - 1
            assert item.start + item.num_new_tokens <= limit, f"step {step} computes past sequence {seq.seq_id}"
        self.calls.append(("launch", step))
        self.feeds.append((output, feed))
        handle = self.runner.launch(output, feed)
        inner = handle.result

        def result():
            self.calls.append(("result", step))
            return inner()

        handle.result = result
        return handle

    def execute(self, output: SchedulerOutput):
        return self.launch(output).result()

    def release(self, seq_id: int) -> None:
        self.runner.release(seq_id)

    def overlapped_steps(self) -> int:
        """Steps k whose successor was launched before k's result was read."""
        at = {call: i for i, call in enumerate(self.calls)}
        return sum(1 for (kind, k), i in at.items() if kind == "result" and at.get(("launch", k + 1), i) < i)


def drive(llm: kiln.LLM, requests: list[tuple[list[int], kiln.SamplingParams, frozenset[int]]],
          actions: dict[int, tuple[int, str]]) -> tuple[dict[int, list], dict[int, str | None], list[bool]]:
    """Two requests start; the others arrive two every 3 steps. `actions[i] = (k, "finish" | "abort")` ends request
    i from outside right after its k-th token (finish: what LLM does on a stop string). Returns each request's
    events, its finish reason, and whether a step was in flight at each action."""
    eng = llm.engine
    got: dict[int, list] = {}
    seqs: dict[int, Sequence] = {}
    in_flight: list[bool] = []
    pending = list(enumerate(requests))

    def arrive(count: int) -> None:
        for _ in range(min(count, len(pending))):
            i, (prompt, params, stops) = pending.pop(0)
            seqs[i] = Sequence(i, prompt, params.max_tokens, stops, params.ignore_eos, params.min_tokens, params)
            eng.add(seqs[i])
            got[i] = []

    arrive(2)
    steps = 0
    while eng.has_unfinished() or pending:
        for ev in eng.step():
            i = ev.seq.seq_id
            got[i].append((ev.token_id, ev.logprob, ev.top_logprobs, ev.finished, ev.logits))
            action = actions.get(i)
            if action is not None and len(got[i]) == action[0] and not ev.finished:
                in_flight.append(eng.has_step_in_flight)
                eng.abort(i) if action[1] == "abort" else eng.finish(i, FinishReason.STOP)
        steps += 1
        if steps % 3 == 0:
            arrive(2)
        assert steps < 2000, "the engine stopped making progress"
    return got, {i: s.finish_reason.value if s.finish_reason else None for i, s in seqs.items()}, in_flight


def assert_same_events(a: dict[int, list], b: dict[int, list]) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert [e[0] for e in a[i]] == [e[0] for e in b[i]], f"request {i}: tokens differ"
        assert [e[3] for e in a[i]] == [e[3] for e in b[i]], f"request {i}: finished flags differ"
        # Batches differ between the two runs, so float results are compared to fp32 rounding.
        assert [e[1] for e in a[i]] == pytest.approx([e[1] for e in b[i]], abs=1e-5)
        for ea, eb in zip(a[i], b[i]):
            assert [t for t, _ in ea[2]] == [t for t, _ in eb[2]]
            assert [v for _, v in ea[2]] == pytest.approx([v for _, v in eb[2]], abs=1e-5)
            assert (ea[4] is None) == (eb[4] is None)
            if ea[4] is not None:
                torch.testing.assert_close(ea[4], eb[4], rtol=0, atol=1e-4)


def test_async_matches_sync_on_a_mixed_workload(engine):
    """Arrivals, chunking, preemption, prefix hits, stop tokens, min_tokens, seeds, logprobs, logits, a stop string
    and an abort during a step in flight: the same events with async scheduling on and off."""
    ref = make_llm(engine, async_on=False).generate(PROMPTS[2:4], greedy(18, ignore_eos=True))
    stop2 = ref[0].outputs[0].token_ids[3]  # emitted by request 2 at its 4th token at the latest
    stop3 = ref[1].outputs[0].token_ids[1]
    requests = [
        (PROMPTS[0], greedy(20, ignore_eos=True, logprobs=3), frozenset()),
        (PROMPTS[1], kiln.SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=7, logprobs=0,
                                         ignore_eos=True), frozenset()),
        (PROMPTS[2], greedy(18), frozenset({stop2})),
        (PROMPTS[3], greedy(15, min_tokens=5), frozenset({stop3})),
        (PROMPTS[4], kiln.SamplingParams(max_tokens=7, temperature=1.2, min_p=0.05, seed=3, return_logits=True,
                                         ignore_eos=True), frozenset()),
        (PROMPTS[5], greedy(1, ignore_eos=True), frozenset()),
        (PROMPTS[0], greedy(9, ignore_eos=True), frozenset()),  # a prefix-cache hit on request 0's prompt
        (PROMPTS[2], greedy(16, ignore_eos=True), frozenset()),
    ]
    actions = {6: (3, "finish"), 7: (4, "abort")}
    runs = {}
    for async_on in (False, True):
        llm = make_llm(engine, async_on, blocks=14)
        runs[async_on] = drive(llm, requests, actions)
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny cache was meant to force preemption"
        assert llm.engine.scheduler.block_manager.num_prefix_hit_tokens > 0
        assert llm.engine.num_launched_ahead > (10 if async_on else -1)
        assert_idle(llm)
    (sync_events, sync_reasons, _), (async_events, async_reasons, in_flight) = runs[False], runs[True]
    assert_same_events(sync_events, async_events)
    assert sync_reasons == async_reasons
    assert async_reasons[2] == "stop" and len(async_events[2]) <= 4
    # min_tokens 5: the stop token is banned for the first five tokens, so request 3 runs at least that long.
    assert len(async_events[3]) >= 5 and stop3 not in [e[0] for e in async_events[3][:5]]
    assert [len(async_events[i]) for i in (0, 1, 4, 5, 6, 7)] == [20, 12, 7, 1, 3, 4]
    assert (async_reasons[6], async_reasons[7]) == ("stop", "abort")
    assert in_flight == [True, True]  # both ended while the next step of theirs was already launched


def test_lookahead_happens_and_no_step_runs_past_a_limit(engine):
    """Each step but the last is launched before the previous one's tokens are read; sequences that end by length
    (max_tokens, or max_model_len for a request allowed to run that far) never get a step past their end."""
    outs = {}
    for async_on in (False, True):
        llm = make_llm(engine, async_on)
        recorder = Recorder(llm.runner, MAX_LEN)
        llm.engine.executor = recorder
        eng = llm.engine
        seqs = [Sequence(i, PROMPTS[i], m, ignore_eos=True, params=greedy(m)) for i, m in enumerate((1, 2, 5, 9))]
        seqs.append(Sequence(9, PROMPTS[2], 40, ignore_eos=True, params=greedy(40)))  # stops at max_model_len
        for seq in seqs:
            eng.add(seq)
        got: dict[int, list[int]] = {seq.seq_id: [] for seq in seqs}
        while eng.has_unfinished():
            for ev in eng.step():
                got[ev.seq.seq_id].append(ev.token_id)
        assert [len(got[s.seq_id]) for s in seqs] == [1, 2, 5, 9, MAX_LEN - len(PROMPTS[2])]
        assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
        launches = sum(1 for kind, _ in recorder.calls if kind == "launch")
        if async_on:
            # Every step but the last overlaps the next (none of these sequences needs host tokens).
            assert recorder.overlapped_steps() == launches - 1
            assert any(feed is not None and feed.tokens for _, feed in recorder.feeds)
        else:
            assert recorder.overlapped_steps() == 0
        assert_idle(llm)
        outs[async_on] = got
    assert outs[True] == outs[False]


class FailingLaunch(Recorder):
    """A runner whose launch of step `fail_at` raises, as a device error or out-of-memory would."""

    def __init__(self, runner, fail_at: int) -> None:
        super().__init__(runner, MAX_LEN)
        self.fail_at = fail_at

    def launch(self, output: SchedulerOutput, feed: StepFeed | None = None):
        if sum(1 for kind, _ in self.calls if kind == "launch") == self.fail_at:
            raise RuntimeError("launch failed")
        return super().launch(output, feed)


def test_a_failed_launch_leaves_no_placeholder_behind(engine):
    """The launch of step N+1 fails after step N's sequences were advanced with placeholders: the error reaches the
    caller, and every sequence holds step N's real tokens (those of a synchronous run), none of the placeholder."""
    reference = make_llm(engine, False)
    want = [o.outputs[0].token_ids for o in reference.generate(PROMPTS[:3], greedy(8, ignore_eos=True))]
    llm = make_llm(engine, True)
    llm.engine.executor = FailingLaunch(llm.runner, fail_at=6)
    seqs = [Sequence(i, p, 8, ignore_eos=True, params=greedy(8, ignore_eos=True)) for i, p in enumerate(PROMPTS[:3])]
    for seq in seqs:
        llm.engine.add(seq)
    with pytest.raises(RuntimeError, match="launch failed"):
        while llm.engine.has_unfinished():
            llm.engine.step()
    for seq, expected in zip(seqs, want):
        assert seq.output_token_ids and seq.output_token_ids == expected[:len(seq.output_token_ids)]


def test_penalties_and_bad_words_fall_back_with_the_same_tokens(engine):
    """Rows that need their previous tokens on the host are never fed a placeholder's token on the device; their
    next step launches after the previous one resolves. Other rows keep overlapping. Same tokens as in sync."""
    requests = [
        (PROMPTS[0], greedy(12, repetition_penalty=1.3, ignore_eos=True), frozenset()),
        (PROMPTS[1], kiln.SamplingParams(max_tokens=10, temperature=0.9, seed=11, presence_penalty=0.5,
                                         frequency_penalty=0.3, ignore_eos=True), frozenset()),
        (PROMPTS[2], greedy(8, ignore_eos=True), frozenset()),
        (PROMPTS[4], greedy(10, bad_word_ids=[[7, 8], [3]], ignore_eos=True), frozenset()),
        (PROMPTS[5], greedy(20, ignore_eos=True), frozenset()),  # runs on alone at the end: launched ahead again
    ]
    events = {}
    for async_on in (False, True):
        llm = make_llm(engine, async_on)
        recorder = Recorder(llm.runner, MAX_LEN)
        llm.engine.executor = recorder
        events[async_on], _, _ = drive(llm, requests, {})
        if async_on:
            for output, feed in recorder.feeds:
                if feed is None or not feed.tokens:
                    continue
                fed = {output_index_seq(output, index).seq_id for index, _ in feed.tokens}
                assert not fed & {0, 1, 3}, "a row needing host tokens was launched ahead"
            assert recorder.overlapped_steps() > 0
        assert_idle(llm)
    assert_same_events(events[False], events[True])
    assert needs_host_tokens(requests[3][1]) and not needs_host_tokens(greedy(3, bad_word_ids=[[3]]))


def output_index_seq(output: SchedulerOutput, index: int) -> Sequence:
    """The sequence whose new tokens include packed token `index`."""
    at = 0
    for item in output.scheduled:
        if at <= index < at + item.num_new_tokens:
            return item.seq
        at += item.num_new_tokens
    raise IndexError(index)


def test_beam_requests_run_synchronously_with_the_same_beams(engine):
    """A beam request added while a step is in flight: that step completes, steps run one at a time while the
    beam group lives, then lookahead resumes. Beams, scores and the other requests' tokens as in sync."""
    beam = kiln.SamplingParams(max_tokens=6, num_beams=3, n=2, ignore_eos=True)
    plain = greedy(14, ignore_eos=True)
    results = {}
    for async_on in (False, True):
        llm = make_llm(engine, async_on)
        eng = llm.engine
        eng.add(Sequence(eng.new_seq_id(), PROMPTS[0], 14, ignore_eos=True, params=plain))
        tokens: list[int] = []
        beams = None
        for step in range(200):
            if step == 2:
                assert eng.has_step_in_flight is async_on
                eng.add(Sequence(eng.new_seq_id(), PROMPTS[2], 6, ignore_eos=True, params=beam))
            for ev in eng.step():
                if isinstance(ev, BeamEvent):
                    beams = [(b.token_ids, round(b.score, 5)) for b in ev.beams]
                else:
                    tokens.append(ev.token_id)
            if not eng.has_unfinished():
                break
        assert beams is not None and len(beams) == 2 and len(tokens) == 14
        assert_idle(llm)
        results[async_on] = (tokens, beams, eng.num_launched_ahead)
    assert results[True][:2] == results[False][:2]
    assert results[True][2] > 0
    api = {on: make_llm(engine, on).generate([PROMPTS[1], PROMPTS[3]], [beam, plain]) for on in (False, True)}
    assert [[o.token_ids for o in r.outputs] for r in api[True]] == [[o.token_ids for o in r.outputs]
                                                                     for r in api[False]]


def test_executors_that_cannot_launch_ahead_run_synchronously(engine):
    """The multi-rank driver says can_launch_ahead = False; an executor with only `execute` has no launch. Both
    run steps one at a time; the runner refuses a feed outside its batch."""
    llm = make_llm(engine, async_on=True)

    class Driver:
        can_launch_ahead = False
        launch = llm.runner.launch

    class Plain:
        def execute(self, output):
            return llm.runner.execute(output)

        def release(self, seq_id):
            llm.runner.release(seq_id)

    from kiln.executor.multirank import MultiRankDriver

    assert MultiRankDriver.can_launch_ahead is False and llm.runner.can_launch_ahead is True
    assert not LLMEngine(llm.engine.scheduler, Driver()).async_scheduling
    plain = LLMEngine(llm.engine.scheduler, Plain())
    assert not plain.async_scheduling
    plain.add(Sequence(0, PROMPTS[1], 4, ignore_eos=True, params=greedy(4)))
    got = [ev.token_id for _ in range(10) for ev in plain.step()]
    assert got == make_llm(engine, False).generate([PROMPTS[1]], greedy(4, ignore_eos=True))[0].outputs[0].token_ids
    from kiln.engine.scheduler import ScheduledSeq
    seq = Sequence(5, PROMPTS[3], 2, params=greedy(2))
    seq.block_table = [0]
    first = llm.runner.launch(SchedulerOutput([ScheduledSeq(seq, 1)], [], [], 1))
    seq.num_computed_tokens = 1
    seq.append_token(0)
    with pytest.raises(ValueError, match="outside this step"):
        llm.runner.launch(SchedulerOutput([ScheduledSeq(seq, 1)], [], [], 1), StepFeed(first, [(0, 3)]))
    fed = llm.runner.launch(SchedulerOutput([ScheduledSeq(seq, 1)], [], [], 1), StepFeed(first, [(0, 0)]))
    seq.token_ids[-1] = first.result()[0][5]
    assert fed.result()[0] == llm.runner.execute(SchedulerOutput([ScheduledSeq(seq, 1)], [], [], 1))[0]


def test_cli_flag_turns_it_off(engine, tmp_path, capsys, monkeypatch):
    """kiln run schedules asynchronously by default and synchronously with --no_async_scheduling; same output."""
    import kiln.cli.run_cmd as run_cmd

    made: list[bool] = []

    def recording_llm(*args, **kwargs):
        llm = kiln.LLM(*args, **kwargs)
        made.append(llm.engine.async_scheduling)
        return llm

    monkeypatch.setattr(run_cmd, "LLM", recording_llm)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS[:3]) + "\n")
    outs = []
    for flag in ([], ["--no_async_scheduling"]):
        out_json = tmp_path / f"out{len(flag)}.json"
        assert kiln_main(["run", "--engine_dir", str(engine), "--input_file", str(prompts), "--max_output_len", "6",
                          "--output_json", str(out_json), *flag]) == 0
        outs.append([item["output_ids"] for item in json.loads(out_json.read_text())])
    assert outs[0] == outs[1]
    assert made == [True, False]
    capsys.readouterr()
