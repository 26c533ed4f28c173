"""The engine loop: requests in, one scheduled step at a time, tokens out. Plain Python: the model work happens in
an executor (the model runner of one rank, or the driver of several) that it is handed."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Protocol

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


class LLMEngine:
    """add_request / step / abort over a scheduler and an executor."""

    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler, self.executor = scheduler, executor
        self._ids = itertools.count()

    def new_seq_id(self) -> int:
        return next(self._ids)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, seq_id: int) -> None:
        if self.scheduler.abort(seq_id) is not None:
            self.executor.release(seq_id)

    def finish(self, seq_id: int, reason: FinishReason) -> None:
        """End a sequence for a reason found outside the scheduler (a stop string)."""
        if self.scheduler.finish(seq_id, reason) is not None:
            self.executor.release(seq_id)

    def step(self) -> list[TokenEvent]:
        """Run one step; return one event per sequence that got a token."""
        output = self.scheduler.schedule()
        if output.is_empty:
            return []
        sampled, details = self.executor.execute(output)
        order = [item.seq for item in output.scheduled if item.needs_sample]
        finished = {seq.seq_id for seq in self.scheduler.postprocess(output, sampled)}
        events = []
        for row, seq in enumerate(order):
            if seq.seq_id not in sampled:
                continue
            top = details.top_logprobs[row] if details is not None and details.top_logprobs else []
            logprob = details.logprobs[row] if details is not None else None
            events.append(TokenEvent(seq, sampled[seq.seq_id], logprob, top, seq.seq_id in finished))
            if seq.seq_id in finished:
                self.executor.release(seq.seq_id)
        return events
