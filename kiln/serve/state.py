"""The server's state: its configuration, the engine (loaded in its own process while /health says 503), admission (a
bounded queue in front of a bounded number of running requests) and the prompt checks made before admission."""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from kiln.runtime_checks import check_param_ids, check_prompt_ids
from kiln.sampling_params import SamplingParams
from kiln.serve.engine_client import EngineClient
from kiln.serve.engine_process import EngineSettings, start_engine_process
from kiln.serve.errors import APIError, bad_request
from kiln.serve.metrics import ServerMetrics
from kiln.serve.served_model import ServedModel

logger = logging.getLogger(__name__)
MiB = 2**20
# Requests handed to the engine per batch slot by default: more than the batch holds, so that the scheduler has the
# next request queued the moment a sequence finishes (no step runs with a slot idle while the server hands one over).
DEFAULT_RUNNING_PER_SLOT = 2


@dataclass(frozen=True)
class ServeConfig(EngineSettings):
    """`kiln serve`'s settings (docs/serving.md describes each): the engine process's (EngineSettings: engine and
    tokenizer directories, device, KV cache, graphs, async scheduling, warm-up) and the server's below."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queue: int = 1024
    max_concurrent_requests: int | None = None  # None: twice the engine's max_batch_size (DEFAULT_RUNNING_PER_SLOT)
    max_request_bytes: int = 4 * MiB
    chat_template: str | None = None
    shutdown_timeout_s: float = 30.0

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.engine_dir).resolve().name


class Admission:
    """At most `running` requests generate at once and at most `queue` wait for a turn; one more is a 429."""

    def __init__(self, running: int, queue: int) -> None:
        self.limit, self.queue = running, queue
        self.slots = asyncio.Semaphore(running)
        self.waiting = 0

    def check(self) -> None:
        if self.waiting >= self.queue and self.slots.locked():
            raise APIError(429, f"the server is full: {self.limit} requests running and {self.waiting} queued (the "
                                f"queue holds {self.queue}); retry later", code="queue_full")

    async def enter(self) -> bool:
        """Wait for a running slot, or raise the 429; cancellation leaves the queue cleanly."""
        self.check()
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        return True

    def leave(self) -> None:
        self.slots.release()


class ServerState:
    """Everything the handlers share. `status` is loading, ready, stopping or failed. The engine runs in its own
    process (engine_process.py); this process holds `model` (config and tokenizer, no weights) and `engine`, the
    client of that process."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.status = "loading"
        self.metrics = ServerMetrics()
        self.model: ServedModel | None = None
        self.engine: EngineClient | None = None
        self.admission: Admission | None = None
        self.load_error: str | None = None
        # One thread tokenizes prompts: off the event loop, and never two encodes at once on one tokenizer.
        self.tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-tokenize")

    # ---- life cycle ----------------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Start the engine process, read the model's config and tokenizer here while it loads (the server answers
        503 meanwhile), and wait for it to say ready."""
        loop = asyncio.get_running_loop()
        try:
            # On the loop's thread (about 10 ms: fork, exec, the spawn data), so that a stop that cancels the load
            # always finds the process it must end in self.engine.
            process, commands, events = start_engine_process(self.engine_settings())
            self.engine = EngineClient(commands, events, loop, process)
            self.model = await loop.run_in_executor(None, self._load_model)
            await self.engine.wait_ready()
        except Exception as err:  # EngineLoadError, a bad engine directory or tokenizer, no process to start
            logger.error("kiln serve: cannot load the engine: %s", err)
            self.load_error, self.status = str(err), "failed"
            return
        gc.collect()
        gc.freeze()  # the tokenizer's objects leave the collector's scans: fewer, shorter pauses while serving
        build = self.model.build
        running = self.config.max_concurrent_requests or DEFAULT_RUNNING_PER_SLOT * build.max_batch_size
        self.admission = Admission(running, self.config.max_queue)
        engine = self.engine
        self.metrics.bind_engine(lambda: self.admission.waiting, lambda: engine.stats.running,
                                 lambda: engine.stats.waiting, lambda: engine.stats.blocks_used, engine.blocks_total,
                                 lambda: engine.step_stats)
        if self.status == "loading":
            self.status = "ready"
            logger.info("kiln serve: %s ready on http://%s:%d", self.config.model_name, self.config.host,
                        self.config.port)

    def engine_settings(self) -> EngineSettings:
        """The config's engine-side part, as a plain EngineSettings for the engine process."""
        return EngineSettings(**{f.name: getattr(self.config, f.name) for f in fields(EngineSettings)})

    def _load_model(self) -> ServedModel:
        c = self.config
        return ServedModel.load(c.engine_dir, c.tokenizer_dir, c.chat_template)

    def begin_shutdown(self) -> None:
        """Refuse new requests (503, /health too) and, after shutdown_timeout_s, end those still running with a 503
        error (streams get it as their last event), so that every connection closes before the server exits.
        Called on the event loop's thread."""
        if self.status in ("ready", "loading"):
            self.status = "stopping"
        if self.engine is not None:
            error = APIError(503, "the server is shutting down and this request ran past its grace period "
                                  f"({self.config.shutdown_timeout_s:g} s); retry elsewhere or later")
            self.engine.loop.call_later(self.config.shutdown_timeout_s, self.engine.abort_all, error)

    async def close(self) -> None:
        """Stop generating (requests still running end with a 503 error), then stop the engine process (it frees
        the engine and its rank processes)."""
        self.status = "stopping"
        if self.engine is not None:
            await self.engine.stop(APIError(503, "the server is shutting down; retry elsewhere or later"))
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        return self.status == "ready" and self.engine is not None and self.engine.failed is None

    def require_ready(self) -> None:
        if self.status == "loading":
            raise APIError(503, "the engine is still loading; retry when GET /health answers 200")
        if self.status == "stopping":
            raise APIError(503, "the server is shutting down; retry elsewhere or later")
        if not self.healthy:
            raise APIError(503, f"the engine is not serving ({self.load_error or 'it failed; see the server log'})")

    # ---- prompts -------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise bad_request(f"{what} needs a tokenizer and the engine carries none; start kiln serve with "
                              "--tokenizer_dir")
        return self.tokenizer

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run tokenizer work in the tokenizer thread; its ValueErrors (TokenizerError) are the client's 400s."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)
        except ValueError as err:
            raise bad_request(str(err)) from None

    async def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return await self.off_loop(self.need_tokenizer("a text prompt").encode, prompt)
        return list(prompt)

    def check_prompt(self, ids: list[int], params: SamplingParams, which: str) -> None:
        """The engine's limits, named with their values: vocabulary, max_input_len, max_seq_len."""
        build, vocab = self.model.build, self.model.vocab_size
        if len(ids) > build.max_input_len:
            raise bad_request(f"{which} has {len(ids)} tokens, more than this engine's limit of {build.max_input_len} "
                              "prompt tokens (max_input_len); shorten the prompt", "prompt", "context_length_exceeded")
        try:
            check_prompt_ids(ids, vocab, which)
            check_param_ids(params, vocab)
        except ValueError as err:
            raise bad_request(str(err), "prompt") from None
        if len(ids) + params.max_tokens > build.max_seq_len:
            raise bad_request(f"{which} ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this engine's "
                              f"max_seq_len of {build.max_seq_len} tokens; lower max_tokens", "max_tokens",
                              "context_length_exceeded")

    def default_max_tokens(self, prompt_len: int) -> int:
        """What a chat request without max_tokens may generate: the rest of the engine's sequence length."""
        return max(1, self.model.build.max_seq_len - prompt_len)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)

