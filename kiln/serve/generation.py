"""The asyncio side of one HTTP request's generation: one engine request per prompt, their deltas merged in arrival
order, metrics observed as they arrive, and every engine request aborted when the consumer leaves early."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import AsyncIterator

from kiln.sampling_params import SamplingParams
from kiln.serve.engine_client import EngineClient, Submission
from kiln.serve.errors import APIError
from kiln.serve.metrics import ServerMetrics
from kiln.serve.step_loop import Delta

_ids = itertools.count()


class Generation:
    """Generates for `prompts` (token ids each) with `params` each; iterate `events()` for lists of (prompt index,
    deltas). A consumer that stops iterating (a client that disconnected) must call `abort()`; `events()` does so itself when
    it is closed or cancelled."""

    def __init__(self, engine: EngineClient, prompts: list[list[int]], params: list[SamplingParams],
                 stop_ids: list[frozenset[int]], metrics: ServerMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids = [f"{next(_ids)}" for _ in prompts]
        self.remaining = sum(p.n for p in params)
        self.arrival = time.perf_counter()
        self._last: float | None = None
        self.num_prompt_tokens = sum(len(p) for p in prompts)
        self.num_output_tokens = 0
        for index, (rid, ids, p, stops) in enumerate(zip(self.request_ids, prompts, params, stop_ids)):
            engine.submit(Submission(rid, ids, p, stops, lambda item, i=index: self.queue.put_nowait((i, item))))
        metrics.prompt_tokens.inc(self.num_prompt_tokens)

    async def events(self) -> AsyncIterator[list[tuple[int, list[Delta]]]]:
        """Every (prompt index, deltas) that has arrived, as a list: one item per engine step when the consumer keeps
        up, several when it fell behind (a stream then writes them in one send)."""
        try:
            while self.remaining:
                ready = [await self.queue.get()]
                while not self.queue.empty():
                    ready.append(self.queue.get_nowait())
                for _, item in ready:
                    if isinstance(item, APIError):
                        raise item
                    self._observe(item)
                    self.remaining -= sum(1 for d in item if d.finish_reason is not None)
                yield ready
        finally:
            self.abort()

    def abort(self) -> None:
        """Free the engine's sequences of every prompt still generating (a no-op once all have finished)."""
        if self.remaining:
            self.remaining = 0
            for rid in self.request_ids:
                self.engine.abort(rid)

    def _observe(self, deltas: list[Delta]) -> None:
        now = time.perf_counter()
        if self._last is None:
            self.metrics.time_to_first_token.observe(now - self.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - self._last)
        self._last = now
        tokens = sum(len(d.token_ids) for d in deltas)
        self.num_output_tokens += tokens
        self.metrics.generation_tokens.inc(tokens)
