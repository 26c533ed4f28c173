"""The engine loop: requests in, one scheduled step at a time, tokens out. Plain Python: the model work happens in
an executor (the model runner of one rank, or the driver of several) that it is handed."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Protocol

from kiln.engine.beam_search import BeamGroup, Hypothesis
from kiln.engine.scheduler import Scheduler, SchedulerOutput
from kiln.engine.sequence import FinishReason, Sequence


class Executor(Protocol):
    def execute(self, output: SchedulerOutput) -> tuple[dict[int, int], Any]: ...

    def release(self, seq_id: int) -> None: ...


@dataclass
class TokenEvent:
    """A sequence's new token from one step (`logprob` of the raw model distribution), and whether it finished."""

    seq: Sequence
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finished: bool = False
    logits: Any = None  # the step's raw logits ([vocab] float32) when the request asked return_logits


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

    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler, self.executor = scheduler, executor
        self._ids = itertools.count()
        self._groups: dict[int, BeamGroup] = {}  # request id -> its beam group

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

    def finish(self, seq_id: int, reason: FinishReason) -> None:
        """End a sequence for a reason found outside the scheduler (a stop string)."""
        if self.scheduler.finish(seq_id, reason) is not None:
            self.executor.release(seq_id)

    def step(self) -> list[TokenEvent | BeamEvent]:
        """Run one step; return one event per sequence that got a token, and one per beam request that ended."""
        output = self.scheduler.schedule()
        if output.is_empty:
            return []
        sampled, details = self.executor.execute(output)
        order = [item.seq for item in output.scheduled if item.needs_sample]
        finished = {seq.seq_id for seq in self.scheduler.postprocess(output, sampled)}
        events: list[TokenEvent | BeamEvent] = []
        beam_rows = []
        top_rows = details.top_logprobs if details is not None and details.top_logprobs else None
        logit_rows = getattr(details, "logits", None)
        for row, seq in enumerate(order):
            if seq.group_id is not None:
                beam_rows.append((row, seq))
                continue
            if seq.seq_id not in sampled:
                continue
            top = top_rows[row] if top_rows else []
            logprob = details.logprobs[row] if details is not None else None
            logits = logit_rows[row] if logit_rows else None
            events.append(TokenEvent(seq, sampled[seq.seq_id], logprob, top, seq.seq_id in finished, logits))
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
