"""The engine loop: requests in, one scheduled step at a time, tokens out. Plain Python: the model work happens in
an executor (the model runner of one rank, or the driver of several) that it is handed.

Async scheduling (one step of lookahead): with an executor that can `launch` a step whose placeholder input tokens
take the previous step's sampled ids on its device, each `step()` call finds step N in flight, advances N's
sequences with placeholder tokens (Scheduler.postprocess_ahead), schedules and launches N+1, and only then waits
for N's tokens, settles them (stop checks, finishing) and returns N's events. The host's work for N thus overlaps
the device's work for N+1. Steps fall back to running one at a time while a beam-search request is in the engine
(its group chooses tokens on the host), and N+1 is launched after N resolves when one of its sampling rows needs
the real previous token on the host (penalties, multi-token bad words).

Every step() call is counted in `step_stats` (kiln/engine/step_stats.py): its kind (decode in a CUDA graph, eager
decode, prefill, mixed), sequences, prefill tokens and host wall time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Protocol

from kiln.engine.beam_search import BeamGroup, Hypothesis
from kiln.engine.scheduler import Scheduler, SchedulerOutput, StepFeed
from kiln.engine.sequence import FinishReason, Sequence, SequenceStatus
from kiln.engine.step_stats import StepStats

PLACEHOLDER_TOKEN = 0  # the token id a sequence holds, on the host, for a token of the step in flight


class Executor(Protocol):
    """What the engine needs of an executor. Async scheduling also uses, when present, `launch(output, feed)`
    returning a handle with `result()` (what `execute` returns), unless the executor sets `can_launch_ahead`
    False."""

    def execute(self, output: SchedulerOutput) -> tuple[dict[int, int], Any]: ...

    def release(self, seq_id: int) -> None: ...


@dataclass
class _InFlight:
    """A launched step: its schedule, the executor's handle, the sampling rows' sequences (row order) and, once
    advanced, {seq_id: placeholder position or None} from Scheduler.postprocess_ahead."""

    output: SchedulerOutput
    handle: Any
    order: list[Sequence]
    ahead: dict[int, int | None] | None = None


def needs_host_tokens(params: Any) -> bool:
    """Whether sampling a request needs its previous tokens on the host: penalties count them, a multi-token bad
    word matches them, and so does a no-repeat n-gram (one-token bad words, min_tokens, seeds and the rest need only
    the count)."""
    if params is None:
        return False
    return (params.has_penalty or bool(params.bad_words) or any(len(w) > 1 for w in params.bad_word_ids)
            or params.no_repeat_ngram_size > 0)


@dataclass
class TokenEvent:
    """A sequence's new token from one step (`logprob` of the raw model distribution), and whether it finished."""

    seq: Sequence
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finished: bool = False
    logits: Any = None  # the step's raw logits ([vocab] float32) when the request asked return_logits
    rank: int | None = None  # the token's 1-based rank in the raw distribution, when the step computed ranks


@dataclass
class BeamEvent:
    """A beam-search request ended: its best hypotheses, best first (at most `params.n`). `seq` is the request's
    first sequence (its id is the request's id). Beam requests report nothing before they end."""

    seq: Sequence
    beams: list[Hypothesis]
    finished: bool = True


class LLMEngine:
    """add_request / step / abort over a scheduler and an executor. A sequence whose params ask for beam search
    (`params.use_beam_search`) becomes a beam group: its beams are sequences forked from it, and it yields one
    BeamEvent when the search ends."""

    def __init__(self, scheduler: Scheduler, executor: Executor, async_scheduling: bool = True) -> None:
        self.scheduler, self.executor = scheduler, executor
        self._ids = itertools.count()
        self._groups: dict[int, BeamGroup] = {}  # request id -> its beam group
        # One step of lookahead where the executor can launch a step ahead of the previous one's tokens.
        self.async_scheduling = bool(async_scheduling and callable(getattr(executor, "launch", None))
                                     and getattr(executor, "can_launch_ahead", True))
        self._inflight: _InFlight | None = None
        self.num_launched_ahead = 0  # steps launched before the previous step's tokens were read
        self.step_stats = StepStats()

    def new_seq_id(self) -> int:
        return next(self._ids)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        if getattr(seq.params, "use_beam_search", False):
            self._groups[seq.seq_id] = BeamGroup.start(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, seq_id: int) -> None:
        """Cancel a request (for a beam request: the id it was added with, and all its beams go)."""
        group = self._groups.pop(seq_id, None)
        if group is not None:
            for beam_id in group.abort(self.scheduler):
                self.executor.release(beam_id)
        elif self.scheduler.abort(seq_id) is not None:
            self.executor.release(seq_id)
        self._drop_idle_step()

    def finish(self, seq_id: int, reason: FinishReason) -> None:
        """End a sequence for a reason found outside the scheduler (a stop string)."""
        if self.scheduler.finish(seq_id, reason) is not None:
            self.executor.release(seq_id)
        self._drop_idle_step()

    @property
    def has_step_in_flight(self) -> bool:
        return self._inflight is not None

    def _drop_idle_step(self) -> None:
        """A step in flight whose sequences have all finished has nothing to give: forget it (its device work
        completes on its own; nothing reads it)."""
        step = self._inflight
        if step is not None and all(item.seq.is_finished for item in step.output.scheduled):
            self._inflight = None

    def step(self) -> list[TokenEvent | BeamEvent]:
        """Run one step; return one event per sequence that got a token, and one per beam request that ended. With
        async scheduling the step returned is the one launched before, and the next is in flight on return."""
        start = self.step_stats.begin(self._inflight is not None)
        events = self._step()
        self.step_stats.end(start, self.scheduler.has_unfinished())
        return events

    def _step(self) -> list[TokenEvent | BeamEvent]:
        if not self.async_scheduling or self._groups:
            if self._inflight is not None:  # a beam request arrived: finish the step in flight, then run in sync
                step, self._inflight = self._inflight, None
                return self._complete(step)
            output = self.scheduler.schedule()
            if output.is_empty:
                return []
            order = [item.seq for item in output.scheduled if item.needs_sample]
            graph_steps = self._graph_steps()
            result = self.executor.execute(output)
            self.step_stats.launched(output, self._graph_steps() != graph_steps)
            return self._complete(_InFlight(output, _Done(result), order))
        if self._inflight is None:
            output = self.scheduler.schedule()
            if output.is_empty:
                return []
            self._inflight = self._launch(output, None)
        return self._step_ahead()

    def _launch(self, output: SchedulerOutput, feed: StepFeed | None) -> _InFlight:
        order = [item.seq for item in output.scheduled if item.needs_sample]
        graph_steps = self._graph_steps()
        handle = self.executor.launch(output, feed)
        self.step_stats.launched(output, self._graph_steps() != graph_steps)
        return _InFlight(output, handle, order)

    def _graph_steps(self) -> int:
        """The executor's count of steps that replayed a CUDA graph (ModelRunner.num_graph_steps): whether a decode
        step did is the runner's choice (batch size, block-table width), so the engine asks rather than guesses."""
        return getattr(self.executor, "num_graph_steps", 0)

    def _complete(self, step: _InFlight) -> list[TokenEvent | BeamEvent]:
        """Resolve a step that was not advanced ahead: the synchronous path (postprocess, then events)."""
        sampled, details = step.handle.result()
        live = [seq for seq in step.order if seq.status is SequenceStatus.RUNNING]
        finished = {seq.seq_id for seq in self.scheduler.postprocess(step.output, sampled)}
        tokens = {seq.seq_id: sampled[seq.seq_id] for seq in live if seq.group_id is None and seq.seq_id in sampled}
        return self._events(step.order, tokens, finished, details)

    def _step_ahead(self) -> list[TokenEvent | BeamEvent]:
        """Advance step N (in flight) with placeholders, schedule N+1 and launch it (at once when its rows need no
        host tokens, else after N), resolve N and return its events; N+1 stays in flight."""
        step, self._inflight = self._inflight, None
        step.ahead = self.scheduler.postprocess_ahead(step.output, PLACEHOLDER_TOKEN)
        output = self.scheduler.schedule()
        launched = None
        if not output.is_empty and self._can_feed(output, step):
            try:
                launched = self._launch(output, self._feed(output, step))
            except BaseException:
                # N's tokens still replace its placeholders, so no sequence is left holding one; then the error
                # goes up as it would from a synchronous step.
                self._resolve(step)
                raise
            self.num_launched_ahead += 1
        events = self._resolve(step)
        if launched is None and not output.is_empty:
            output = _without_finished(output)  # sequences that ended with N's tokens
            if not output.is_empty:
                launched = self._launch(output, None)
        self._inflight = launched
        self._drop_idle_step()
        return events

    def _can_feed(self, output: SchedulerOutput, step: _InFlight) -> bool:
        """No sampling row of the next step needs, on the host, a token that is still a placeholder."""
        return not any(item.needs_sample and step.ahead.get(item.seq.seq_id) is not None
                       and needs_host_tokens(item.seq.params) for item in output.scheduled)

    @staticmethod
    def _feed(output: SchedulerOutput, step: _InFlight) -> StepFeed:
        """(index in the packed new tokens, row of N's sampled ids) for every placeholder that the step computes."""
        rows = {seq.seq_id: row for row, seq in enumerate(step.order)}
        tokens, at = [], 0
        for item in output.scheduled:
            position = step.ahead.get(item.seq.seq_id)
            if position is not None and item.start <= position < item.start + item.num_new_tokens:
                tokens.append((at + position - item.start, rows[item.seq.seq_id]))
            at += item.num_new_tokens
        return StepFeed(step.handle, tokens)

    def _resolve(self, step: _InFlight) -> list[TokenEvent | BeamEvent]:
        """Wait for an advanced step's tokens, put them in place of its placeholders, finish the sequences that
        stop, and build its events. Sequences that finished meanwhile (a stop token in the step before, an abort,
        a stop string) get no event: their results are dropped."""
        sampled, details = step.handle.result()
        tokens: dict[int, int] = {}
        finished: set[int] = set()
        for seq in step.order:
            if seq.seq_id not in step.ahead:
                continue  # finished before this step was advanced
            done = self.scheduler.settle(seq, sampled[seq.seq_id], step.ahead[seq.seq_id])
            if done is None:
                continue
            tokens[seq.seq_id] = sampled[seq.seq_id]
            if done:
                finished.add(seq.seq_id)
        return self._events(step.order, tokens, finished, details)

    def _events(self, order: list[Sequence], tokens: dict[int, int], finished: set[int],
                details: Any) -> list[TokenEvent | BeamEvent]:
        """One TokenEvent per row whose sequence got a token (`tokens`), releasing those that finished; beam rows
        go to their groups."""
        events: list[TokenEvent | BeamEvent] = []
        beam_rows = []
        top_rows = details.top_logprobs if details is not None and details.top_logprobs else None
        logit_rows = getattr(details, "logits", None)
        for row, seq in enumerate(order):
            if seq.group_id is not None:
                beam_rows.append((row, seq))
                continue
            if seq.seq_id not in tokens:
                continue
            top = top_rows[row] if top_rows else []
            logprob = details.logprobs[row] if details is not None else None
            logits = logit_rows[row] if logit_rows else None
            rank = details.ranks[row] if details is not None and getattr(details, "ranks", None) else None
            events.append(TokenEvent(seq, tokens[seq.seq_id], logprob, top, seq.seq_id in finished, logits, rank))
            if seq.seq_id in finished:
                self.executor.release(seq.seq_id)
        if beam_rows:
            events.extend(self._step_beams(beam_rows, details))
        return events

    def _step_beams(self, beam_rows: list[tuple[int, Sequence]], details: Any) -> list[BeamEvent]:
        """Hand each beam's candidates to its group; advance every group that has heard from all its beams."""
        candidates = getattr(details, "beam_candidates", None)
        if candidates is None:
            raise RuntimeError("the executor returned no beam candidates for beam-search rows; its sampler must fill "
                               "SamplerOutput.beam_candidates")
        touched: dict[int, BeamGroup] = {}
        for row, seq in beam_rows:
            group = self._groups.get(seq.group_id)
            if group is None or not seq.paused:
                continue  # aborted while the step ran
            group.report(seq.seq_id, candidates[row])
            touched[group.request_id] = group
        events = []
        for group in touched.values():
            if not group.ready:
                continue  # a beam was preempted before it reported; it reports once recomputed
            for seq_id in group.advance(self.scheduler, self.new_seq_id):
                self.executor.release(seq_id)
            if group.search.done:
                del self._groups[group.request_id]
                events.append(BeamEvent(group.root, group.search.results(group.root.params.n)))
        return events


class _Done:
    """The handle of a step that has already run (the synchronous path)."""

    def __init__(self, result: tuple[dict[int, int], Any]) -> None:
        self._result = result

    def result(self) -> tuple[dict[int, int], Any]:
        return self._result


def _without_finished(output: SchedulerOutput) -> SchedulerOutput:
    """The schedule less the sequences that finished since it was made (their blocks are already free)."""
    kept = [item for item in output.scheduled if not item.seq.is_finished]
    if len(kept) == len(output.scheduled):
        return output
    return SchedulerOutput(kept, output.preempted, output.block_copies, sum(item.num_new_tokens for item in kept))
