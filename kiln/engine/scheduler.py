"""Continuous batching: each step, decide which sequences run and how many of their tokens.

A step's tokens are packed into one batch under a token budget (`max_num_batched_tokens`) and a sequence limit
(`max_num_seqs`). Decodes go first (one token each, latency), then unfinished chunked prefills, then new requests
in arrival order. When the KV cache runs out, the newest running sequence is preempted: its blocks are freed and
it is recomputed later from its tokens (prompt + outputs so far), which the prefix cache often makes cheap.

The model runner gets, for every `ScheduledSeq`, tokens `seq.token_ids[start : start + num_new_tokens]` at those
positions, writes their K/V at the slots of `seq.block_table`, and samples a token only where `needs_sample`.
"""

from __future__ import annotations

import bisect
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kiln.engine.block_manager import BlockManager
from kiln.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: `num_new_tokens` tokens from position `start` (its computed count when
    scheduled)."""

    seq: Sequence
    num_new_tokens: int
    start: int = field(init=False)
    _needs_sample: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Snapshot at scheduling time: postprocess advances the sequence afterwards.
        self.start = self.seq.num_computed_tokens
        self._needs_sample = self.start + self.num_new_tokens >= self.seq.num_tokens

    @property
    def needs_sample(self) -> bool:
        """True when this step computes the sequence's last token, so its logits give the next token."""
        return self._needs_sample


@dataclass
class SchedulerOutput:
    """What one step runs: the scheduled sequences (in batch order), the sequences preempted to make room (their
    K/V is gone), the (src, dst) block copies to make before the step, and the total number of new tokens."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class StepFeed:
    """The input tokens of a step launched before the previous step's tokens reached the host: each entry of
    `tokens` is (index in this step's packed new tokens, row of the previous step's sampled ids), and that input
    token is a placeholder the executor replaces on its device with the sampled id. `previous` is the previous
    step's in-flight handle, as the executor's `launch` returned it."""

    previous: Any
    tokens: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    """Decides each step's batch (continuous batching with chunked prefill and preemption by recompute) and
    applies its results (sampled tokens, finishing)."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} is {value!r}; it must be an integer >= 1")
        if max_model_len < 2:
            raise ValueError(f"max_model_len is {max_model_len}; it must be >= 2 (one prompt token + one output)")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # ordered by arrival
        self._seqs: dict[int, Sequence] = {}  # unfinished sequences by id
        self._next_arrival = 0
        self.num_preemptions = 0

    # ---- requests ------------------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence with this id, if any."""
        return self._seqs.get(seq_id)

    def add(self, seq: Sequence) -> None:
        """Queue a new request. Raises ValueError if it can never run with this engine's limits."""
        if seq.seq_id in self._seqs:
            raise ValueError(f"a request with id {seq.seq_id} is already queued or running; ids must be unique")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id} is not a fresh request (status {seq.status.name}); add new ones")
        self._check_fits(seq)
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        self.waiting.append(seq)
        self._seqs[seq.seq_id] = seq

    def _check_fits(self, seq: Sequence) -> None:
        n = seq.num_tokens
        if n > self.max_model_len - 1:
            raise ValueError(
                f"request {seq.seq_id}: the prompt has {n} tokens but max_model_len is {self.max_model_len}, which "
                f"leaves room for prompts of at most {self.max_model_len - 1} tokens; shorten the prompt or build "
                f"the engine with a larger max_seq_len"
            )
        if not self.enable_chunked_prefill and n > self.max_num_batched_tokens:
            raise ValueError(
                f"request {seq.seq_id}: the prompt has {n} tokens, more than max_num_batched_tokens = "
                f"{self.max_num_batched_tokens}, and chunked prefill is off; enable chunked prefill or raise "
                f"max_num_batched_tokens"
            )
        # The sequence grows to at most this many tokens; the last one is sampled, never written to the cache.
        max_len = min(n + seq.max_tokens, self.max_model_len)
        bm = self.block_manager
        need = -(-(max_len - 1) // bm.block_size)
        if need > bm.num_blocks:
            raise ValueError(
                f"request {seq.seq_id}: it may grow to {max_len} tokens ({n} prompt + up to {seq.max_tokens} new), "
                f"whose KV needs {need} blocks of {bm.block_size} tokens, but the cache has only {bm.num_blocks}; "
                f"lower max_tokens or give the KV cache more memory"
            )

    def fork(self, parent_id: int, child: Sequence) -> None:
        """Add `child` (made by `parent.fork(new_id)`) beside its parent: a running parent shares its KV blocks with
        it (copy on write); a waiting (preempted) parent has none, so the child waits right behind it and is
        computed from its tokens, like its parent."""
        parent = self._seqs.get(parent_id)
        if parent is None or parent.status is SequenceStatus.FINISHED:
            raise ValueError(f"fork: sequence {parent_id} is not running or waiting; only a live one can be forked")
        if child.seq_id in self._seqs:
            raise ValueError(f"fork: a request with id {child.seq_id} already exists; ids must be unique")
        if child.token_ids[: parent.num_tokens] != parent.token_ids:
            raise ValueError(f"fork: sequence {child.seq_id} does not start with the tokens of parent {parent_id}; "
                             "create it with parent.fork(new_id)")
        child.arrival = self._next_arrival
        self._next_arrival += 1
        self._seqs[child.seq_id] = child
        if parent.status is SequenceStatus.WAITING:
            child.status = SequenceStatus.WAITING
            self.waiting.insert(self.waiting.index(parent) + 1, child)
            return
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)  # the newest arrival sorts last

    def resume(self, seq_id: int, token_id: int) -> None:
        """Give a paused beam its next token (chosen by its beam group) and let it be scheduled again."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"resume: sequence {seq_id} is not running or waiting")
        seq.append_token(token_id)
        seq.paused = False

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancel a waiting or running request; returns it (finished with ABORT), or None if it is not here."""
        return self.finish(seq_id, FinishReason.ABORT)

    def finish(self, seq_id: int, reason: FinishReason) -> Sequence | None:
        """Finish a request for a reason decided outside the scheduler (a stop string, a client abort) and free
        its blocks. Returns the sequence, or None if no unfinished request has this id."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, reason)
        return seq

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self._seqs.pop(seq.seq_id, None)

    # ---- scheduling ----------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's batch: decodes, then chunked prefills in progress, then new requests (FIFO)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()
        # Paused beams have computed every token and wait for their group; sequences awaiting the token of a step in
        # flight (they finish with it) wait for it: they are in neither list.
        ready = [s for s in self.running if not s.paused and not s.awaiting_token]
        decodes = [s for s in ready if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in ready if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:  # both in arrival order
            if budget == 0 or len(out.scheduled) == self.max_num_seqs:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            copies = self._reserve(seq, n, scheduled_ids, out)
            if copies is None:
                continue  # it preempted itself
            self._add_scheduled(out, seq, n, copies, scheduled_ids)
            budget -= n
        # Freshly preempted sequences wait at the queue front; admitting them now would only thrash.
        if not out.preempted:
            self._admit_waiting(out, budget, scheduled_ids)
            if not out.scheduled:
                self._unblock(out, budget, scheduled_ids)
        return out

    def _unblock(self, out: SchedulerOutput, budget: int, scheduled_ids: set[int]) -> None:
        """Nothing could run: the running sequences are all paused beams (waiting for a sibling) and the waiting
        ones do not fit. Paused beams already reported their candidates, so their K/V can go (they are recomputed
        when resumed): preempt them, newest first, until a waiting sequence is admitted."""
        while not out.scheduled and any(not s.paused for s in self.waiting):
            paused = [s for s in self.running if s.paused]
            if not paused:
                return
            self._preempt(paused[-1], out)
            self._admit_waiting(out, budget, scheduled_ids)

    def _add_scheduled(
        self, out: SchedulerOutput, seq: Sequence, n: int, copies: list[tuple[int, int]], ids: set[int]
    ) -> None:
        out.scheduled.append(ScheduledSeq(seq, n))
        out.block_copies.extend(copies)
        out.num_batched_tokens += n
        ids.add(seq.seq_id)

    def _reserve(
        self, seq: Sequence, n: int, scheduled_ids: set[int], out: SchedulerOutput
    ) -> list[tuple[int, int]] | None:
        """Get blocks for `n` new tokens of running `seq`, preempting the newest running sequences not yet
        scheduled in this step until they fit. Returns the block copies, or None if `seq` itself was preempted."""
        bm = self.block_manager
        while not bm.can_append(seq, n):
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled_ids)
            self._preempt(victim, out)
            if victim is seq:
                return None
        return bm.append_slots(seq, n)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free a running sequence's K/V and requeue it at the front; it is recomputed from its tokens later."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, out: SchedulerOutput, budget: int, scheduled_ids: set[int]) -> None:
        """Admit waiting sequences in order while they fit; stop at the first that does not (FIFO fairness).
        Paused beams (preempted while waiting for their group) are passed over until they are resumed."""
        bm = self.block_manager
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.paused or seq.awaiting_token:
                continue
            if not bm.can_allocate(seq):
                break
            to_compute = seq.num_tokens - bm.peek_prefix_hit_tokens(seq)
            # Without chunked prefill a prompt runs whole; only a recompute after preemption (prompt + outputs)
            # can exceed the whole budget, and that one is chunked rather than left to wait forever.
            if not self.enable_chunked_prefill and budget < to_compute <= self.max_num_batched_tokens:
                break
            self.waiting.remove(seq)
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            copies = bm.append_slots(seq, n)  # allocate covered every token: nothing to add or copy
            self._add_scheduled(out, seq, n, copies, scheduled_ids)
            budget -= n

    # ---- results -------------------------------------------------------------------------------------------------

    def postprocess(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a step's results: advance computed counts, register computed blocks in the prefix cache, append
        the sampled tokens (seq_id -> token for the sequences with needs_sample) and finish sequences. Beams
        (`group_id` set) get no token here: they are paused until their group resumes them. Returns the sequences
        that finished in this step (their blocks are already freed)."""
        finished: list[Sequence] = []
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted or finished from outside while the step ran
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.mark_computed(seq)
            if not item.needs_sample:
                continue
            if seq.group_id is not None:
                seq.paused = True  # a beam: its group chooses the next token once every beam has reported
                continue
            if seq.seq_id not in sampled:
                raise ValueError(f"postprocess: no sampled token for sequence {seq.seq_id}, which needed one")
            seq.append_token(sampled[seq.seq_id])
            reason = self._stop_reason(seq)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def postprocess_ahead(self, output: SchedulerOutput, placeholder: int = 0) -> dict[int, int | None]:
        """Advance a step's sequences before its tokens are known, so that the next step can be scheduled while it
        runs: computed counts and prefix-cache blocks as `postprocess` does, and each sequence that samples gets
        `placeholder` as its next token, except one that surely finishes by length with this token: it gets none
        and is `awaiting_token` (not scheduled) until `settle` gives it the token. Sequences no longer running
        (finished from outside) are skipped. Returns {seq_id: position of its placeholder, or None when awaiting}
        for the sequences that sample; `settle` each of them once the step's tokens are known."""
        ahead: dict[int, int | None] = {}
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if seq.group_id is not None:
                raise ValueError(f"postprocess_ahead: sequence {seq.seq_id} is a beam; beam groups choose their "
                                 "tokens on the host, so their steps cannot run ahead (use postprocess)")
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.mark_computed(seq)
            if not item.needs_sample:
                continue
            if seq.num_output_tokens + 1 >= seq.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
                seq.awaiting_token = True  # its last token: no step may run past the sequence's limits
                ahead[seq.seq_id] = None
            else:
                ahead[seq.seq_id] = seq.num_tokens
                seq.append_token(placeholder)
        return ahead

    def settle(self, seq: Sequence, token_id: int, position: int | None) -> bool | None:
        """Give a sequence advanced by `postprocess_ahead` its real token (at its placeholder's `position`, or
        appended when it was awaiting it) and finish it if it stops; it may be running or, preempted meanwhile,
        waiting. Returns whether it finished now, or None when it had already finished (its token is dropped)."""
        seq.awaiting_token = False
        if seq.status is SequenceStatus.FINISHED:
            return None
        if position is None:
            seq.append_token(token_id)
        else:
            seq.token_ids[position] = operator.index(token_id)
        reason = self._stop_reason(seq)
        if reason is None:
            return False
        self.finish(seq.seq_id, reason)
        return True

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        """Why `seq` stops after its newest token, if it does. A stop token stays in the output."""
        if (
            not seq.ignore_eos
            and seq.last_token_id in seq.stop_token_ids
            and seq.num_output_tokens >= seq.min_tokens
        ):
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
