"""The server's state: its configuration, the engine (loaded in a thread while /health says 503), admission (a
bounded queue in front of a bounded number of running requests) and the prompt checks made before admission."""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kiln.runtime_checks import check_param_ids, check_prompt_ids
from kiln.sampling_params import SamplingParams
from kiln.serve.engine_loop import EngineLoop
from kiln.serve.errors import APIError, bad_request
from kiln.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)
MiB = 2**20
# Requests handed to the engine per batch slot by default: more than the batch holds, so that the scheduler has the
# next request queued the moment a sequence finishes (no step runs with a slot idle while the server hands one over).
DEFAULT_RUNNING_PER_SLOT = 2


@dataclass
class ServeConfig:
    """`kiln serve`'s settings (docs/serving.md describes each)."""

    engine_dir: str
    tokenizer_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queue: int = 1024
    max_concurrent_requests: int | None = None  # None: twice the engine's max_batch_size (DEFAULT_RUNNING_PER_SLOT)
    max_request_bytes: int = 4 * MiB
    chat_template: str | None = None
    device: str | None = None
    kv_cache_free_gpu_memory_fraction: float = 0.9
    kv_cache_max_tokens: int | None = None
    use_cuda_graphs: bool = True
    async_scheduling: bool = True
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
    """Everything the handlers share. `status` is loading, ready, stopping or failed."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.status = "loading"
        self.metrics = ServerMetrics()
        self.llm: Any = None
        self.loop_engine: EngineLoop | None = None
        self.admission: Admission | None = None
        self.load_error: str | None = None
        # One thread tokenizes prompts: off the event loop, and never two encodes at once on one tokenizer.
        self.tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-tokenize")

    # ---- life cycle ----------------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the engine in a thread (the server answers 503 meanwhile), then start its loop."""
        loop = asyncio.get_running_loop()
        try:
            self.llm = await loop.run_in_executor(None, self._load_llm)
        except Exception as err:
            logger.error("kiln serve: cannot load the engine: %s", err)
            self.load_error, self.status = str(err), "failed"
            return
        gc.collect()
        gc.freeze()  # the loaded engine's objects leave the collector's scans: fewer, shorter pauses while serving
        build = self.llm.build
        running = self.config.max_concurrent_requests or DEFAULT_RUNNING_PER_SLOT * build.max_batch_size
        self.admission = Admission(running, self.config.max_queue)
        self.loop_engine = EngineLoop(self.llm.engine, self.llm.tokenizer, loop, self._engine_thread_device)
        scheduler = self.llm.engine.scheduler
        blocks = scheduler.block_manager
        self.metrics.bind_engine(lambda: self.admission.waiting, lambda: scheduler.num_running,
                                 lambda: scheduler.num_waiting, lambda: blocks.num_blocks - blocks.num_free_blocks, blocks.num_blocks)
        self.loop_engine.start()
        if self.status == "loading":
            self.status = "ready"
            logger.info("kiln serve: %s ready on http://%s:%d", self.config.model_name, self.config.host,
                        self.config.port)

    def _load_llm(self) -> Any:
        from kiln.llm import LLM

        c = self.config
        llm = LLM(c.engine_dir, tokenizer_dir=c.tokenizer_dir, device=c.device,
                  kv_cache_free_gpu_memory_fraction=c.kv_cache_free_gpu_memory_fraction,
                  use_cuda_graphs=c.use_cuda_graphs, async_scheduling=c.async_scheduling,
                  kv_cache_max_tokens=c.kv_cache_max_tokens)
        if c.chat_template is not None and llm.tokenizer is not None:
            llm.tokenizer.set_chat_template(Path(c.chat_template).read_text(encoding="utf-8"))
        return llm

    def begin_shutdown(self) -> None:
        """Refuse new requests (503, /health too) and, after shutdown_timeout_s, end those still running with a 503
        error (streams get it as their last event), so that every connection closes before the server exits.
        Called on the event loop's thread."""
        if self.status in ("ready", "loading"):
            self.status = "stopping"
        if self.loop_engine is not None:
            error = APIError(503, "the server is shutting down and this request ran past its grace period "
                                  f"({self.config.shutdown_timeout_s:g} s); retry elsewhere or later")
            self.loop_engine.loop.call_later(self.config.shutdown_timeout_s, self.loop_engine.abort_all, error)

    def _engine_thread_device(self) -> None:
        """CUDA's current device is per thread: the engine's thread gets the engine's (cuda:N), as the loading
        thread had it."""
        device = getattr(self.llm.runner, "device", None)
        if device is not None and device.type == "cuda" and device.index is not None:
            import torch

            torch.cuda.set_device(device)

    def close(self) -> None:
        """Stop generating (requests still running end with a 503 error) and end the engine's rank processes."""
        self.status = "stopping"
        if self.loop_engine is not None:
            self.loop_engine.stop(self.config.shutdown_timeout_s)
        if self.llm is not None:
            self.llm.close()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        return self.status == "ready" and self.loop_engine is not None and self.loop_engine.failed is None

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
        return self.llm.tokenizer

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
        build, vocab = self.llm.build, self.llm.info.model.vocab_size
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
        return max(1, self.llm.build.max_seq_len - prompt_len)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)

