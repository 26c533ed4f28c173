"""The server's handle on the engine process: submissions and aborts out, each step's deltas in, on the event loop.

Nothing here runs in a thread of its own. Commands are written to the pipe without blocking (what the pipe cannot
take now waits in an outbox that the event loop writes when the pipe has room), and the engine's messages are read by
an `add_reader` callback, which hands every request's deltas to its sink. So the event loop never waits on the
engine, and the engine never waits on a client: a slow reader only lets its own queue grow.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pickle
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from kiln.sampling_params import SamplingParams
from kiln.serve.errors import APIError
from kiln.serve.step_loop import Delta, EngineStats

logger = logging.getLogger(__name__)
_as_delta = functools.partial(tuple.__new__, Delta)  # a Delta from the plain tuple that crossed the pipe
EXIT_TIMEOUT_S = 30.0  # how long a stopping engine may take to free itself and its ranks before it is killed


class EngineLoadError(RuntimeError):
    """The engine process could not load the engine (the message says why)."""


@dataclass
class Submission:
    """A request for the engine: its prompt, params, and where its deltas go (called on the event loop)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    sink: Callable[[list[Delta] | APIError], None]


class _Pending:
    def __init__(self, sink: Callable[[Any], None], outputs: int) -> None:
        self.sink, self.outputs = sink, outputs  # outputs still generating


class _Outbox:
    """Pickled commands onto a pipe in multiprocessing.Connection's framing (a 4-byte big-endian length, then the
    pickle), so that the engine reads them with Connection.recv; written without blocking the event loop."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn, self.loop, self.fd = conn, loop, conn.fileno()
        os.set_blocking(self.fd, False)
        self.pending = bytearray()

    def send(self, command: tuple) -> None:
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        frame = struct.pack("!i", len(data)) + data
        if self.pending:
            self.pending += frame
        else:
            self._write(memoryview(frame))

    def _write(self, data: memoryview) -> None:
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the engine is gone; its pipe's end of file tells the reader
            self.pending.clear()
            return
        if written < len(data):
            self.pending += data[written:]
            self.loop.add_writer(self.fd, self._flush)

    def _flush(self) -> None:
        data, self.pending = bytes(self.pending), bytearray()
        self.loop.remove_writer(self.fd)
        self._write(memoryview(data))

    def close(self) -> None:
        if self.pending:
            self.loop.remove_writer(self.fd)
        self.conn.close()


class EngineClient:
    """submit / abort / abort_all / stop, as the engine loop had them; `failed` says why the engine stopped
    serving (None while it serves), `stats` is the engine's state after its last step, `step_stats` its StepStats
    summary as last sent (None before the first; at most STEP_STATS_INTERVAL_S old while busy, current when idle)."""

    def __init__(self, commands: Connection, events: Connection, loop: asyncio.AbstractEventLoop,
                 process: Any = None) -> None:
        self.loop, self.process, self.events = loop, process, events
        self.outbox = _Outbox(commands, loop)
        self.failed: str | None = None
        self.stats = EngineStats()
        self.step_stats: dict[str, Any] | None = None
        self.blocks_total = 0
        self._sent = 0  # commands written (the engine's stats.handled catches up with it)
        self._requests: dict[str, _Pending] = {}
        self._ready: asyncio.Future = loop.create_future()
        # A load error nobody awaits (the server's own part of loading failed first) is not an unretrieved error.
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._reading = True
        loop.add_reader(events.fileno(), self._on_readable)

    async def wait_ready(self) -> None:
        """Until the engine has loaded; EngineLoadError with the engine's reason if it could not."""
        await self._ready

    # ---- commands ------------------------------------------------------------------------------------------------

    def submit(self, sub: Submission) -> None:
        if self.failed is not None:
            sub.sink(self._failure())
            return
        self._requests[sub.request_id] = _Pending(sub.sink, sub.params.n)
        self._send(("add", sub.request_id, sub.prompt_ids, sub.params, sub.stop_ids))

    def abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self._send(("abort", request_id))

    def abort_all(self, error: APIError) -> None:
        """End every request now, each with `error` (a graceful stop whose grace period is over)."""
        self._fail_requests(error)
        self._send(("abort_all",))

    def _send(self, command: tuple) -> None:
        if self.failed is None:
            self._sent += 1
            self.outbox.send(command)

    @property
    def num_requests(self) -> int:
        """Requests the server waits on."""
        return len(self._requests)

    @property
    def idle(self) -> bool:
        """No request in flight on either side, and the engine has taken every command sent (its stats are current)."""
        return not self._requests and self.stats.handled == self._sent and self.stats.requests == 0

    # ---- messages ------------------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            while self._reading and self.events.poll():
                self._handle(self.events.recv())
        except (EOFError, OSError):
            self._engine_gone(None)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "out":
            self._deliver(message[1], message[2])
            self.stats = message[3]
            if message[4] is not None:
                self.step_stats = message[4]
        elif kind == "ready":
            self.blocks_total = message[1]
            self._ready.set_result(None)
        elif kind == "load_error":
            self._stop_reading()
            self._ready.set_exception(EngineLoadError(message[1]))
        elif kind == "failed":
            self._engine_gone(message[1])

    def _deliver(self, outputs: list[tuple[str, list[tuple]]], refused: list[tuple[str, str]]) -> None:
        requests = self._requests
        for request_id, plain in outputs:
            pending = requests.get(request_id)
            if pending is None:  # aborted here while the step ran
                continue
            deltas = [_as_delta(d) for d in plain]
            pending.sink(deltas)
            for delta in deltas:
                if delta.finish_reason is not None:
                    pending.outputs -= 1
            if pending.outputs <= 0:
                del requests[request_id]
        for request_id, why in refused:
            pending = requests.pop(request_id, None)
            if pending is not None:
                pending.sink(APIError(400, why))

    def _engine_gone(self, error_name: str | None) -> None:
        """The engine failed (`error_name`) or its process ended: every request ends with a 500 error, the server
        stays up and answers 503."""
        if self.failed is not None:
            return
        self._stop_reading()
        self.failed = error_name or self._exit_reason()
        if not self._ready.done():
            self._ready.set_exception(EngineLoadError(f"the engine process ended while loading ({self.failed})"))
            return
        logger.error("kiln serve: the engine stopped serving: %s", self.failed)
        self._fail_requests(self._failure())

    def _exit_reason(self) -> str:
        if self.process is None:
            return "its process ended"
        self.process.join(0.5)  # its pipe closed: it is exiting; the exit code says how (a negative one: a signal)
        return f"its process ended with exit code {self.process.exitcode}"

    def _failure(self) -> APIError:
        return APIError(500, f"the engine failed ({self.failed}); see the server log")

    def _fail_requests(self, error: APIError) -> None:
        requests, self._requests = self._requests, {}
        for pending in requests.values():
            pending.sink(error)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.events.fileno())

    # ---- stop ----------------------------------------------------------------------------------------------------

    async def stop(self, error: APIError) -> None:
        """End what is still running with `error`, close the engine's pipe (its signal to free the engine and exit),
        and wait for the process: killed if it does not end within EXIT_TIMEOUT_S (at once if it is still loading)."""
        self._fail_requests(error)
        self._stop_reading()
        self.outbox.close()
        if self.process is not None:
            timeout = EXIT_TIMEOUT_S if self._ready.done() else 0.0
            await self.loop.run_in_executor(None, end_process, self.process, timeout)
        self.events.close()
        if not self._ready.done():
            self._ready.cancel()


def end_process(process: Any, timeout: float) -> None:
    """Wait up to `timeout` for `process` to exit, then kill it (it ignores SIGTERM: the server decides)."""
    process.join(timeout)
    if process.is_alive():
        if timeout > 0:
            logger.warning("kiln serve: the engine process did not exit within %.0f s; killing it", timeout)
        process.kill()
        process.join(10)
