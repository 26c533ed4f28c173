"""Running the server: uvicorn on the app, SIGTERM as a graceful stop.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets in-flight requests finish for up to
`shutdown_timeout_s`, then cancels what is left (each cancelled request aborts its sequences); the lifespan's end
stops the engine loop and the engine's rank processes, and `kiln serve` exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

import uvicorn

from kiln.serve.app import create_app
from kiln.serve.state import ServeConfig

KEEP_ALIVE_S = 5  # as vLLM and trtllm-serve
# uvicorn's own cancellation of requests, after kiln's grace period plus this: a backstop only, since kiln ends every
# request itself when its grace period is over (ServerState.begin_shutdown).
BACKSTOP_S = 10


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: object) -> None:
        super().__init__(config)
        self.kiln_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            try:
                asyncio.get_running_loop().call_soon_threadsafe(self.kiln_state.begin_shutdown)
            except RuntimeError:  # no loop running yet: nothing is in flight
                pass
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # A stop asked for by SIGTERM is the normal end of a server: do not re-raise it after shutdown.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def make_server(config: ServeConfig, log_level: str = "info") -> _Server:
    app = create_app(config)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, access_log=False,
                        timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=config.shutdown_timeout_s + BACKSTOP_S,
                        lifespan="on")
    return _Server(uv, app.state.kiln)


def serve(config: ServeConfig, log_level: str = "info") -> int:
    """Serve until SIGTERM or Ctrl-C; 0 after a clean stop, 2 when the engine could not be loaded."""
    server = make_server(config, log_level)
    server.run()
    state = server.kiln_state
    return 2 if state.load_error is not None else 0
