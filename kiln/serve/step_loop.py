"""The engine's side of serving, with no transport: requests in, one step of the engine, each request's deltas out.

StepLoop owns what happens between `engine.step()` calls: adding a request's n sequences, aborting them, incremental
detokenization, stop strings (which finish the sequence in the engine), and the numbers /metrics shows. It knows
nothing of pipes, threads or HTTP; engine_process.py drives it in the engine's own process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from kiln.engine.llm_engine import LLMEngine, TokenEvent
from kiln.engine.sequence import FinishReason, Sequence
from kiln.sampling_params import SamplingParams


class Delta(NamedTuple):
    """What one step added to one output of a request (`index` in 0..n-1): one token, the text that became final
    with it (possibly empty), its logprob and top logprobs, and the finish reason when the output ended. A tuple:
    a batch's worth cross the pipe to the server every step (as plain tuples: they pickle small and fast)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None


class EngineStats(NamedTuple):
    """The engine's state after a step, for /metrics and for knowing when it is idle. `handled` counts the commands
    it has taken (the server compares it with the commands it sent)."""

    handled: int = 0
    requests: int = 0
    running: int = 0
    waiting: int = 0
    blocks_used: int = 0


class _Output:
    """One output's text as the client sees it: incremental detokenization, stop strings, and a hold-back of
    len(longest stop) - 1 characters so that streamed text never shows the start of a stop string it later cuts."""

    def __init__(self, index: int, detok: Any, params: SamplingParams) -> None:
        self.index, self.detok, self.params = index, detok, params
        self.text, self.sent = "", 0
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def add(self, event: TokenEvent) -> tuple[Delta, bool]:
        """The delta of this token, and whether a stop string ended the output here."""
        stopped = False
        if self.detok is not None:
            before = len(self.text)
            self.text += self.detok.add(event.token_id) + (self.detok.flush() if event.finished else "")
            for stop in self.params.stop:
                at = self.text.find(stop, max(0, before - len(stop) + 1))
                if at >= 0:
                    self.text = self.text[:at + len(stop) if self.params.include_stop_str_in_output else at]
                    stopped = True
                    break
        done = stopped or event.finished
        end = len(self.text) if done else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:end], end
        reason = None
        if stopped:
            reason = FinishReason.STOP.value
        elif event.finished and event.seq.finish_reason is not None:
            reason = event.seq.finish_reason.value
        top = [event.top_logprobs] if event.top_logprobs else []
        logprob = [event.logprob] if event.logprob is not None else []
        return Delta(self.index, [event.token_id], piece, logprob, top, reason), stopped


class _Request:
    def __init__(self, request_id: str, seq_ids: list[int]) -> None:
        self.request_id, self.seq_ids, self.live = request_id, seq_ids, set(seq_ids)


class StepLoop:
    """One engine's requests: `add`, `abort`, then `step()` while `busy` for each step's deltas by request id."""

    def __init__(self, engine: LLMEngine, tokenizer: Any) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self._requests: dict[str, _Request] = {}
        self._owners: dict[int, tuple[_Request, _Output]] = {}  # seq id -> its request and output

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int]) -> \
            str | None:
        """Hand a request's n sequences to the engine; None, or why the engine refuses it (the client's 400)."""
        seqs = []
        for index in range(params.n):
            # The n samples of a seeded request each get their own stream, seed, seed + 1, ... (as kiln.LLM).
            p = params if params.seed is None or index == 0 else dataclasses.replace(
                params, seed=(params.seed + index) % 2**64)
            seqs.append(Sequence(self.engine.new_seq_id(), prompt_ids, p.max_tokens, stop_ids, p.ignore_eos,
                                 p.min_tokens, p))
        try:
            for seq in seqs:
                self.engine.add(seq)
        except ValueError as err:  # the scheduler's own limits (a KV cache too small for the request)
            for seq in seqs:
                self.engine.abort(seq.seq_id)
            return str(err).replace(f"request {seqs[0].seq_id}: ", "")
        request = _Request(request_id, [s.seq_id for s in seqs])
        self._requests[request_id] = request
        for index, seq in enumerate(seqs):
            detok = self._detokenizer(prompt_ids, params.skip_special_tokens)
            self._owners[seq.seq_id] = (request, _Output(index, detok, seq.params))
        return None

    def _detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool) -> Any:
        if self.tokenizer is None:
            return None
        from kiln.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)

    def abort(self, request_id: str) -> None:
        """Free a request's sequences (a no-op for one that has finished or was never added)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for seq_id in request.seq_ids:
            self._owners.pop(seq_id, None)
            self.engine.abort(seq_id)

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)

    def step(self) -> list[tuple[str, list[Delta]]]:
        """One engine step: (request id, its deltas) for every request that got tokens. What the engine raises
        passes through (the caller decides what a broken engine means)."""
        batches: dict[str, list[Delta]] = {}
        for event in self.engine.step():
            owner = self._owners.get(event.seq.seq_id)
            if owner is None or not isinstance(event, TokenEvent):
                continue
            request, output = owner
            delta, stopped = output.add(event)
            if stopped and not event.finished:
                self.engine.finish(event.seq.seq_id, FinishReason.STOP)
            batches.setdefault(request.request_id, []).append(delta)
            if delta.finish_reason is not None:
                del self._owners[event.seq.seq_id]
                request.live.discard(event.seq.seq_id)
                if not request.live:
                    del self._requests[request.request_id]
        return list(batches.items())

    def step_stats(self) -> dict[str, Any] | None:
        """The engine's StepStats.summary() (None for an engine without them)."""
        stats = getattr(self.engine, "step_stats", None)
        return None if stats is None else stats.summary()

    def stats(self, handled: int) -> EngineStats:
        scheduler = self.engine.scheduler
        blocks = scheduler.block_manager
        return EngineStats(handled, len(self._requests), scheduler.num_running, scheduler.num_waiting,
                           blocks.num_blocks - blocks.num_free_blocks)
