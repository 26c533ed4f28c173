"""Scheduler: continuous batching, chunked prefill, preemption by recompute, abort, finishing, fork.

A fake model runner drives it. It keeps a paged "KV cache" of one integer per slot: the value at position p is a
hash of the value at p - 1 (read back from the cache, as attention reads K/V) and token p, so it names the whole
prefix. The sampled token is that value at the last position, salted with the sequence id, modulo a small vocab.
Any mistake in block tables, prefix sharing, copy-on-write or recompute changes the values read back, hence the
tokens, which are compared with a run of the same request alone (no cache at all).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from kiln.engine.block_manager import BlockManager
from kiln.engine.scheduler import Scheduler, SchedulerOutput
from kiln.engine.sequence import FinishReason, Sequence, SequenceStatus

VOCAB = 16
MOD = (1 << 61) - 1


def kv_next(prev: int, token: int) -> int:
    return (prev * 1_000_003 + token + 1) % MOD


def sample(kv_last: int, salt: int) -> int:
    return ((kv_last ^ (salt * 0x9E3779B1)) * 2654435761 % MOD) % VOCAB


class FakeRunner:
    """Executes a SchedulerOutput the way the model runner does, on a cache of ints."""

    def __init__(self, bm: BlockManager) -> None:
        self.bs = bm.block_size
        self.cache: list[tuple[int, int] | None] = [None] * (bm.num_blocks * bm.block_size)  # (position, kv)

    def slot(self, seq: Sequence, p: int) -> int:
        return seq.block_table[p // self.bs] * self.bs + p % self.bs

    def step(self, out: SchedulerOutput) -> dict[int, int]:
        for src, dst in out.block_copies:  # before the step, as the runner must
            self.cache[dst * self.bs : (dst + 1) * self.bs] = self.cache[src * self.bs : (src + 1) * self.bs]
        before = list(self.cache)  # every sequence of the step reads only K/V written before the step
        writes: dict[int, tuple[int, int]] = {}
        sampled: dict[int, int] = {}
        for item in out.scheduled:
            seq, start = item.seq, item.start
            prev = 0
            if start > 0:
                entry = before[self.slot(seq, start - 1)]
                assert entry is not None and entry[0] == start - 1, f"seq {seq.seq_id}: bad KV at {start - 1}"
                prev = entry[1]
            for p in range(start, start + item.num_new_tokens):
                prev = kv_next(prev, seq.token_ids[p])
                s = self.slot(seq, p)
                assert s not in writes, "two tokens written to one slot in one step"
                writes[s] = (p, prev)
            if item.needs_sample:
                sampled[seq.seq_id] = sample(prev, seq.seq_id)
        for s, v in writes.items():
            self.cache[s] = v
        return sampled


def run_alone(seq: Sequence, tokens: list[int], max_model_len: int) -> list[int]:
    """The outputs `seq` would produce with no cache and no other requests, continuing from `tokens`."""
    tokens = list(tokens)
    while True:
        kv = 0
        for t in tokens:
            kv = kv_next(kv, t)
        tokens.append(sample(kv, seq.seq_id))
        n_out = len(tokens) - seq.num_prompt_tokens
        if not seq.ignore_eos and tokens[-1] in seq.stop_token_ids and n_out >= seq.min_tokens:
            break
        if n_out >= seq.max_tokens or len(tokens) >= max_model_len:
            break
    return tokens[seq.num_prompt_tokens :]


def check_invariants(sched: Scheduler, out: SchedulerOutput | None = None) -> None:
    bm = sched.block_manager
    live = list(sched.running) + list(sched.waiting)
    owners: dict[int, list[Sequence]] = {}
    for s in live:
        for b in s.block_table:
            owners.setdefault(b, []).append(s)
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed_tokens == 0 and s.status is SequenceStatus.WAITING
    for block in bm.blocks:
        assert block.ref_count == len(owners.get(block.block_id, [])), f"block {block.block_id} refcount"
    assert bm.num_free_blocks == sum(1 for b in bm.blocks if b.ref_count == 0)
    assert bm.num_free_blocks + len(owners) == bm.num_blocks
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING and 0 <= s.num_computed_tokens < s.num_tokens
    if out is None:
        return
    assert out.num_batched_tokens == sum(i.num_new_tokens for i in out.scheduled) <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    assert len({i.seq.seq_id for i in out.scheduled}) == len(out.scheduled)
    for p in out.preempted:  # recomputed in a later step, not re-admitted at once
        assert p.status is SequenceStatus.WAITING and all(i.seq is not p for i in out.scheduled)
    for item in out.scheduled:
        s = item.seq
        assert item.num_new_tokens >= 1 and item.start == s.num_computed_tokens
        assert item.start + item.num_new_tokens <= s.num_tokens
        assert item.needs_sample == (item.start + item.num_new_tokens == s.num_tokens)
        end_block = -(-(item.start + item.num_new_tokens) // bm.block_size)
        assert len(s.block_table) >= end_block
        for i in range(item.start // bm.block_size, end_block):  # written blocks are private
            assert bm.blocks[s.block_table[i]].ref_count == 1


def drive(sched: Scheduler, runner: FakeRunner, max_steps: int = 1000) -> list[Sequence]:
    finished: list[Sequence] = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        out = sched.schedule()
        check_invariants(sched, out)
        finished += sched.postprocess(out, runner.step(out))
        check_invariants(sched)
    raise AssertionError("requests did not finish")


def make(
    bm_blocks: int = 32, bs: int = 4, seqs: int = 8, budget: int = 64, max_len: int = 64, chunked: bool = True
) -> tuple[Scheduler, FakeRunner]:
    bm = BlockManager(bm_blocks, bs)
    return Scheduler(bm, seqs, budget, max_len, enable_chunked_prefill=chunked), FakeRunner(bm)


def req(seq_id: int, n: int, max_tokens: int = 5, base: int = 0, **kw) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=[(base + 3 * i + seq_id) % VOCAB for i in range(n)],
                    max_tokens=max_tokens, **kw)


# ---- requests ----------------------------------------------------------------------------------------------------


def test_add_rejects_requests_that_can_never_run():
    sched, _ = make(bm_blocks=4, bs=4, budget=8, max_len=32, chunked=False)
    with pytest.raises(ValueError, match="at most 31 tokens"):
        sched.add(req(0, 32))
    with pytest.raises(ValueError, match="chunked prefill is off"):
        sched.add(req(1, 9))
    with pytest.raises(ValueError, match="needs 5 blocks of 4 tokens, but the cache has only 4"):
        sched.add(req(2, 8, max_tokens=13))  # grows to 21 tokens, 20 of them in the cache
    sched.add(req(3, 8, max_tokens=9))  # 17 tokens, 16 cached: fits exactly
    with pytest.raises(ValueError, match="already queued"):
        sched.add(req(3, 2))
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(BlockManager(4, 4), 0, 8, 32)
    assert sched.num_waiting == 1 and sched.has_unfinished()


def test_fifo_admission_stops_at_the_first_request_that_does_not_fit():
    sched, _ = make(budget=10, chunked=False)
    for i, n in enumerate([6, 8, 2]):
        sched.add(req(i, n))
    out = sched.schedule()
    # The 8-token prompt does not fit the 4 tokens left; the 2-token one behind it must not jump the queue.
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [(0, 6)]
    assert sched.num_running == 1 and sched.num_waiting == 2
    chunked, _ = make(budget=10)
    for i, n in enumerate([6, 8, 2]):
        chunked.add(req(i, n))
    out = chunked.schedule()
    assert [(i.seq.seq_id, i.num_new_tokens, i.needs_sample) for i in out.scheduled] == [(0, 6, True), (1, 4, False)]
    assert out.num_batched_tokens == 10


def test_max_num_seqs_limits_the_running_set():
    sched, runner = make(seqs=2)
    for i in range(3):
        sched.add(req(i, 3, max_tokens=2))
    out = sched.schedule()
    assert [i.seq.seq_id for i in out.scheduled] == [0, 1] and sched.num_waiting == 1
    sched.postprocess(out, runner.step(out))
    out = sched.schedule()  # both still decoding: the third still waits
    assert [i.seq.seq_id for i in out.scheduled] == [0, 1]
    finished = sched.postprocess(out, runner.step(out))
    assert [s.seq_id for s in finished] == [0, 1]
    assert [i.seq.seq_id for i in sched.schedule().scheduled] == [2]


# ---- chunked prefill ---------------------------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_while_decodes_continue():
    sched, runner = make(budget=8)
    short = req(0, 3, max_tokens=10)
    sched.add(short)
    out = sched.schedule()
    sched.postprocess(out, runner.step(out))
    long = req(1, 25, max_tokens=3)
    sched.add(long)
    chunks = []
    for _ in range(4):
        out = sched.schedule()
        check_invariants(sched, out)
        plan = {i.seq.seq_id: i for i in out.scheduled}
        assert plan[0].num_new_tokens == 1 and plan[0].needs_sample  # the decode is never starved
        chunks.append((plan[1].num_new_tokens, plan[1].needs_sample))
        sched.postprocess(out, runner.step(out))
    assert chunks == [(7, False), (7, False), (7, False), (4, True)]
    assert long.num_output_tokens == 1 and short.num_output_tokens == 5
    finished = drive(sched, runner)
    assert {s.seq_id for s in finished} == {0, 1}
    for s in (short, long):
        assert s.output_token_ids == run_alone(s, s.prompt_token_ids, 64)
        assert s.finish_reason is FinishReason.LENGTH


def test_prefix_cache_skips_the_shared_prompt():
    sched, runner = make(budget=64)
    first = req(0, 20, max_tokens=2, base=5)
    sched.add(first)
    drive(sched, runner)
    second = Sequence(seq_id=1, prompt_token_ids=first.prompt_token_ids + [7], max_tokens=3)
    sched.add(second)
    out = sched.schedule()
    # 20 prompt tokens = 5 full blocks cached; only the 21st token is computed.
    assert out.num_batched_tokens == 1 and second.num_cached_tokens == 20
    assert sched.block_manager.num_prefix_hit_tokens == 20
    sched.postprocess(out, runner.step(out))
    drive(sched, runner)
    assert second.output_token_ids == run_alone(second, second.prompt_token_ids, 64)


# ---- preemption --------------------------------------------------------------------------------------------------


def test_preemption_frees_the_newest_and_recomputes_it():
    sched, runner = make(bm_blocks=6, bs=4, seqs=4, budget=32, max_len=64)
    seqs = [req(i, 6, max_tokens=8, base=i) for i in range(3)]  # each grows to 13 tokens: 3 blocks of K/V
    for s in seqs:
        sched.add(s)
    preempted_ids = []
    finished = []
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        check_invariants(sched, out)
        for p in out.preempted:
            assert p.status is SequenceStatus.WAITING and p.block_table == [] and p.num_computed_tokens == 0
            assert sched.waiting[0].arrival <= p.arrival  # at the front of the queue, oldest first
            # Whatever was running and survived arrived before the victim.
            assert all(r.arrival < p.arrival for r in sched.running)
        preempted_ids += [p.seq_id for p in out.preempted]
        finished += sched.postprocess(out, runner.step(out))
    assert preempted_ids and preempted_ids[0] == 2  # the newest goes first
    assert sorted(s.seq_id for s in finished) == [0, 1, 2]
    for s in seqs:
        assert s.num_output_tokens == 8 and s.finish_reason is FinishReason.LENGTH
        assert s.output_token_ids == run_alone(s, s.prompt_token_ids, 64)
    assert sched.block_manager.num_free_blocks == 6


def test_a_sequence_preempts_itself_when_it_is_the_newest():
    sched, runner = make(bm_blocks=3, bs=2, seqs=4, budget=16, max_len=64)
    a, b = req(0, 3, max_tokens=3), req(1, 2, max_tokens=3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a: 2 blocks, b: 1 block; the cache is full
    sched.postprocess(out, runner.step(out))
    # a needs no new block for position 3; b (newest) needs one for position 2 and preempts itself.
    out = sched.schedule()
    assert [i.seq.seq_id for i in out.scheduled] == [0] and out.preempted == [b]
    sched.postprocess(out, runner.step(out))
    drive(sched, runner)
    for s in (a, b):
        assert s.output_token_ids == run_alone(s, s.prompt_token_ids, 64)


def test_without_chunked_prefill_a_long_recompute_is_still_chunked():
    # A preempted sequence comes back with prompt + outputs, which may exceed the whole token budget; it must be
    # recomputed in chunks rather than wait forever.
    bm = BlockManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64, enable_chunked_prefill=False)
    runner = FakeRunner(bm)
    a, b = req(0, 6, max_tokens=10), req(1, 6, max_tokens=10)
    sched.add(a)
    sched.add(b)
    chunks = []
    while sched.has_unfinished():
        out = sched.schedule()
        check_invariants(sched, out)
        chunks += [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled if not i.needs_sample]
        sched.postprocess(out, runner.step(out))
    assert sched.num_preemptions > 0 and chunks and all(sid == 1 for sid, _ in chunks)
    for s in (a, b):
        assert s.output_token_ids == run_alone(s, s.prompt_token_ids, 64) and s.num_output_tokens == 10


# ---- abort and finish --------------------------------------------------------------------------------------------


def test_abort_waiting_and_running_returns_every_block():
    sched, runner = make(bm_blocks=8, bs=4, seqs=1, budget=64)
    a, b = req(0, 9, max_tokens=20), req(1, 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a runs, b waits (max_num_seqs=1)
    sched.postprocess(out, runner.step(out))
    assert sched.abort(1) is b and b.finish_reason is FinishReason.ABORT and b.is_finished
    assert sched.abort(0) is a and a.finish_reason is FinishReason.ABORT and a.block_table == []
    assert sched.abort(0) is None and sched.abort(99) is None
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 8
    assert sched.schedule().is_empty


def test_abort_between_schedule_and_postprocess_is_ignored():
    sched, runner = make()
    a = req(0, 5)
    sched.add(a)
    out = sched.schedule()
    sampled = runner.step(out)
    sched.abort(0)
    assert sched.postprocess(out, sampled) == [] and a.num_output_tokens == 0
    assert sched.block_manager.num_free_blocks == 32


def test_finish_for_a_stop_string_found_outside():
    sched, runner = make()
    a = req(0, 5, max_tokens=10)
    sched.add(a)
    out = sched.schedule()
    sched.postprocess(out, runner.step(out))
    assert sched.finish(0, FinishReason.STOP) is a and a.finish_reason is FinishReason.STOP
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 32


def _outputs_without_stop(n_prompt: int, max_tokens: int) -> list[int]:
    probe = req(0, n_prompt, max_tokens=max_tokens)
    return run_alone(probe, probe.prompt_token_ids, 10_000)


@pytest.mark.parametrize("min_tokens, ignore_eos", [(0, False), (3, False), (0, True)])
def test_stop_tokens_min_tokens_and_ignore_eos(min_tokens, ignore_eos):
    free_run = _outputs_without_stop(4, 12)
    stop = free_run[1]  # a token the run produces as its 2nd output
    first = free_run.index(stop)
    later = [i for i, t in enumerate(free_run) if t == stop and i + 1 >= min_tokens]
    sched, runner = make(max_len=10_000)
    seq = req(0, 4, max_tokens=12, stop_token_ids=[stop], min_tokens=min_tokens, ignore_eos=ignore_eos)
    sched.add(seq)
    finished = drive(sched, runner)
    assert finished == [seq]
    if ignore_eos:
        assert seq.output_token_ids == free_run and seq.finish_reason is FinishReason.LENGTH
    elif min_tokens == 0:
        assert seq.output_token_ids == free_run[: first + 1] and seq.finish_reason is FinishReason.STOP
    else:
        expected = free_run[: later[0] + 1] if later else free_run
        assert seq.output_token_ids == expected and seq.num_output_tokens >= min_tokens
        assert seq.finish_reason is (FinishReason.STOP if later else FinishReason.LENGTH)
    assert seq.output_token_ids == run_alone(seq, seq.prompt_token_ids, 10_000)


def test_max_model_len_finishes_with_length():
    sched, runner = make(max_len=12)
    seq = req(0, 9, max_tokens=100)
    sched.add(seq)
    drive(sched, runner)
    assert seq.num_tokens == 12 and seq.num_output_tokens == 3 and seq.finish_reason is FinishReason.LENGTH


def test_postprocess_requires_the_sampled_tokens():
    sched, _ = make()
    sched.add(req(0, 3))
    out = sched.schedule()
    with pytest.raises(ValueError, match="no sampled token for sequence 0"):
        sched.postprocess(out, {})


# ---- fork --------------------------------------------------------------------------------------------------------


def test_forked_sequences_share_the_prompt_and_copy_on_write():
    sched, runner = make(bm_blocks=16, bs=4)
    parent = req(0, 6, max_tokens=6)
    sched.add(parent)
    out = sched.schedule()
    sched.postprocess(out, runner.step(out))  # prompt computed, first token sampled
    at_fork = list(parent.token_ids)
    children = [parent.fork(10 + k) for k in range(2)]
    for c in children:
        sched.fork(0, c)
    assert all(c.block_table == parent.block_table for c in children)
    shared = parent.block_table[1]
    out = sched.schedule()
    check_invariants(sched, out)
    # The partial block (positions 4..6) is shared three ways: the first two writers copy it, the last owns it.
    assert len(out.block_copies) == 2 and {src for src, _ in out.block_copies} == {shared}
    sched.postprocess(out, runner.step(out))
    drive(sched, runner)
    assert parent.output_token_ids == run_alone(parent, parent.prompt_token_ids, 64)
    for c in children:
        assert c.token_ids[: len(at_fork)] == at_fork and c.num_output_tokens == 6
        assert c.output_token_ids == run_alone(c, at_fork, 64)
    assert len({tuple(s.output_token_ids) for s in [parent, *children]}) == 3  # salted: they diverge
    assert sched.block_manager.num_free_blocks == 16
    with pytest.raises(ValueError, match="not running"):
        sched.fork(0, parent.fork(20))


# ---- randomized --------------------------------------------------------------------------------------------------


@dataclass
class Expect:
    seq: Sequence
    start_tokens: list[int]  # tokens the request continues from (its prompt, or the parent's tokens at a fork)


def _random_request(rng: random.Random, seq_id: int, bases: list[list[int]], max_prompt: int) -> Sequence:
    prefix = rng.choice(bases)[: rng.randint(0, max_prompt - 1)]
    prompt = prefix + [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt - len(prefix)))]
    stop = [rng.randrange(VOCAB)] if rng.random() < 0.5 else []
    return Sequence(seq_id=seq_id, prompt_token_ids=prompt, max_tokens=rng.randint(1, 14), stop_token_ids=stop,
                    min_tokens=rng.randint(0, 3), ignore_eos=rng.random() < 0.2)


@pytest.mark.parametrize("seed, chunked", [(0, True), (1, True), (2, True), (3, False), (4, False)])
def test_random_requests_through_a_small_cache(seed, chunked):
    rng = random.Random(seed)
    bs, max_len, budget = 4, 40, (12 if chunked else 20)
    bm = BlockManager(num_blocks=14, block_size=bs)
    sched = Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=budget, max_model_len=max_len,
                      enable_chunked_prefill=chunked)
    runner = FakeRunner(bm)
    bases = [[rng.randrange(VOCAB) for _ in range(20)] for _ in range(3)]
    expect: dict[int, Expect] = {}
    aborted: set[int] = set()
    next_id, done = 0, []
    for _ in range(3000):
        if next_id < 60 and rng.random() < 0.4:
            seq = _random_request(rng, next_id, bases, max_prompt=20)
            sched.add(seq)
            expect[next_id] = Expect(seq, list(seq.prompt_token_ids))
            next_id += 1
        if sched.running and rng.random() < 0.04 and next_id < 60:
            parent = rng.choice(sched.running)
            child = parent.fork(next_id)
            sched.fork(parent.seq_id, child)
            expect[next_id] = Expect(child, list(child.token_ids))
            next_id += 1
        live = list(sched.running) + list(sched.waiting)
        if live and rng.random() < 0.03:
            victim = rng.choice(live)
            assert sched.abort(victim.seq_id) is victim
            aborted.add(victim.seq_id)
        if not sched.has_unfinished():
            if next_id >= 60:
                break
            continue
        out = sched.schedule()
        check_invariants(sched, out)
        assert out.scheduled, "a step with unfinished requests scheduled nothing"
        done += sched.postprocess(out, runner.step(out))
        check_invariants(sched)
    assert not sched.has_unfinished()
    assert len(done) + len(aborted) == len(expect) == 60
    for seq_id, e in expect.items():
        alone = run_alone(e.seq, e.start_tokens, max_len)
        if seq_id in aborted:
            assert e.seq.finish_reason is FinishReason.ABORT
            assert alone[: e.seq.num_output_tokens] == e.seq.output_token_ids
        else:
            assert e.seq.output_token_ids == alone, f"request {seq_id}"
            assert e.seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    # The run exercised what it is meant to check.
    assert sched.num_preemptions > 0 and bm.num_prefix_hit_tokens > 0
