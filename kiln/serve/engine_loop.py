"""The engine's step loop in its own thread, and the asyncio side's view of one request.

The HTTP side never calls the engine: it hands a Submission (or an abort) to EngineLoop, whose thread adds it before
the next step. After each step the thread detokenizes, applies stop strings, and passes every request's new deltas to
the event loop in one `call_soon_threadsafe`; each request's deltas wait in its own unbounded asyncio queue. So the
step loop never waits on a socket: a slow reader only lets its own queue grow (by at most max_tokens deltas).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from kiln.engine.llm_engine import LLMEngine, TokenEvent
from kiln.engine.sequence import FinishReason, Sequence
from kiln.sampling_params import SamplingParams
from kiln.serve.errors import APIError

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks for shutdown


@dataclass
class Delta:
    """What one step added to one output of a request (`index` in 0..n-1): one token, the text that became final
    with it (possibly empty), its logprob and top logprobs, and the finish reason when the output ended."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Submission:
    """A request for the engine thread: its prompt, params, and where its deltas go (called on the event loop)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    sink: Callable[[list[Delta] | APIError], None]


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
    def __init__(self, sub: Submission, seq_ids: list[int]) -> None:
        self.sub, self.seq_ids, self.live = sub, seq_ids, set(seq_ids)


class EngineLoop:
    """Runs `engine.step()` in a thread while there is work; takes submissions and aborts from any thread."""

    def __init__(self, engine: LLMEngine, tokenizer: Any, loop: asyncio.AbstractEventLoop,
                 on_start: Callable[[], None] | None = None) -> None:
        self.engine, self.tokenizer, self.loop = engine, tokenizer, loop
        self._on_start = on_start  # run first in the thread (per-thread device state such as CUDA's current device)
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._requests: dict[str, _Request] = {}
        self._owners: dict[int, tuple[_Request, _Output]] = {}  # seq id -> its request and output
        self.failed: BaseException | None = None
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="kiln-engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, sub: Submission) -> None:
        self._inbox.append(("add", sub))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wake.set()

    def abort_all(self, error: APIError) -> None:
        """End every request now, each with `error` (a graceful stop whose grace period is over)."""
        self._inbox.append(("abort_all", error))
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left and end the thread (the engine is idle afterwards)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def _run(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                events = self.engine.step()
                self.steps += 1
                self._dispatch(events)
        except BaseException as err:  # the engine broke: every request ends with an error, /health turns 503
            logger.exception("the engine loop failed")
            self.failed = err
            self._fail_all(APIError(500, f"the engine failed ({type(err).__name__}); see the server log"))
            return
        self._drain_inbox()
        self._fail_all(APIError(503, "the server is shutting down; retry elsewhere or later"))

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._add(item)
            elif kind == "abort":
                self._abort(item)
            else:
                self._fail_all(item)

    def _add(self, sub: Submission) -> None:
        params, seqs = sub.params, []
        for index in range(params.n):
            # The n samples of a seeded request each get their own stream, seed, seed + 1, ... (as kiln.LLM).
            p = params if params.seed is None or index == 0 else dataclasses.replace(
                params, seed=(params.seed + index) % 2**64)
            seqs.append(Sequence(self.engine.new_seq_id(), sub.prompt_ids, p.max_tokens, sub.stop_ids, p.ignore_eos,
                                 p.min_tokens, p))
        request = _Request(sub, [s.seq_id for s in seqs])
        try:
            for seq in seqs:
                self.engine.add(seq)
        except ValueError as err:  # the scheduler's own limits (a KV cache too small for the request)
            for seq in seqs:
                self.engine.abort(seq.seq_id)
            self._post([(sub.sink, APIError(400, str(err).replace(f"request {seqs[0].seq_id}: ", "")))])
            return
        self._requests[sub.request_id] = request
        for index, seq in enumerate(seqs):
            detok = self._detokenizer(sub.prompt_ids, params.skip_special_tokens)
            self._owners[seq.seq_id] = (request, _Output(index, detok, seq.params))

    def _detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool) -> Any:
        if self.tokenizer is None:
            return None
        from kiln.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)

    def _abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for seq_id in request.seq_ids:
            self._owners.pop(seq_id, None)
            self.engine.abort(seq_id)

    def _dispatch(self, events: list[Any]) -> None:
        """Each event's delta to its request; outputs that a stop string ended are finished in the engine."""
        batches: dict[str, tuple[Callable[[Any], None], list[Delta]]] = {}
        for event in events:
            owner = self._owners.get(event.seq.seq_id)
            if owner is None or not isinstance(event, TokenEvent):
                continue
            request, output = owner
            delta, stopped = output.add(event)
            if stopped and not event.finished:
                self.engine.finish(event.seq.seq_id, FinishReason.STOP)
            batches.setdefault(request.sub.request_id, (request.sub.sink, []))[1].append(delta)
            if delta.finish_reason is not None:
                del self._owners[event.seq.seq_id]
                request.live.discard(event.seq.seq_id)
                if not request.live:
                    del self._requests[request.sub.request_id]
        self._post(list(batches.values()))

    def _post(self, posts: list[tuple[Callable[[Any], None], Any]]) -> None:
        if posts:
            self.loop.call_soon_threadsafe(_deliver, posts)

    def _fail_all(self, error: APIError) -> None:
        posts = [(request.sub.sink, error) for request in self._requests.values()]
        for request in list(self._requests.values()):
            for seq_id in request.seq_ids:
                try:
                    self.engine.abort(seq_id)
                except Exception:  # the engine is broken; nothing more to free
                    pass
        self._requests.clear()
        self._owners.clear()
        try:
            self._post(posts)
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass


def _deliver(posts: list[tuple[Callable[[Any], None], Any]]) -> None:
    for sink, item in posts:
        sink(item)
