"""The engine side of kiln serve without HTTP or a second process: serve_engine (the engine process's loop) in a
thread over two pipes, and the server's EngineClient on an asyncio loop at the other end. A real engine's deltas
give kiln.LLM's text (stop strings, n seeded samples), an abort frees every block, a request the KV cache cannot
take is refused with a 400, a step that raises ends every request with a 500, and commands larger than the pipe
never block the event loop."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading

import pytest

import kiln
from fixtures_serve import shared_mpt_books_engine
from kiln.serve.engine_client import EngineClient, Submission
from kiln.serve.engine_process import serve_engine
from kiln.serve.errors import APIError


class EngineThread:
    """serve_engine(llm) in a thread, wired to an EngineClient made on the running loop by `client()`."""

    def __init__(self, llm) -> None:
        commands_in, self.commands_out = multiprocessing.Pipe(duplex=False)
        self.events_in, events_out = multiprocessing.Pipe(duplex=False)
        self.status: list[int] = []
        self.thread = threading.Thread(target=lambda: self.status.append(serve_engine(llm, commands_in, events_out)))

    def client(self) -> EngineClient:
        return EngineClient(self.commands_out, self.events_in, asyncio.get_running_loop())

    def end(self, client: EngineClient) -> int:
        client.outbox.close()  # the engine's stop signal
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.status[0]


async def collect(client: EngineClient, request_id: str, prompt: list[int], params: kiln.SamplingParams,
                  stop_ids: frozenset[int]) -> tuple[list[str], list[str | None]] | APIError:
    """Each output's text and finish reason, or the error the request ended with."""
    queue: asyncio.Queue = asyncio.Queue()
    client.submit(Submission(request_id, prompt, params, stop_ids, queue.put_nowait))
    texts, reasons = [""] * params.n, [None] * params.n
    while None in reasons:
        item = await asyncio.wait_for(queue.get(), 60)
        if isinstance(item, APIError):
            return item
        for delta in item:
            texts[delta.index] += delta.text
            reasons[delta.index] = delta.finish_reason
    return texts, reasons


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    llm = kiln.LLM(shared_mpt_books_engine(tmp_path_factory), device="cpu")
    yield llm
    llm.close()


def test_deltas_over_the_pipes_give_llm_text_and_aborts_free_every_block(llm):
    prompt = llm.encode("Call me Ishmael. Some years ago,")
    greedy = kiln.SamplingParams(max_tokens=24, temperature=0)
    full = llm.generate([prompt], greedy)[0].outputs[0].text
    stop = full[8:12]
    cut = kiln.SamplingParams(max_tokens=24, temperature=0, stop=[stop])
    want_cut = llm.generate([prompt], cut)[0].outputs[0]
    sampled = kiln.SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=11)
    want_sampled = [o.text for o in llm.generate([prompt], sampled)[0].outputs]
    side = EngineThread(llm)
    side.thread.start()

    async def run() -> None:
        client = side.client()
        await client.wait_ready()
        got_cut, got_sampled = await asyncio.gather(collect(client, "a", prompt, cut, llm.stop_ids(cut)),
                                                    collect(client, "b", prompt, sampled, llm.stop_ids(sampled)))
        assert got_cut == ([want_cut.text], ["stop"]) and want_cut.text == full[:full.find(stop)]
        assert got_sampled[0] == want_sampled and len(set(want_sampled)) > 1
        queue: asyncio.Queue = asyncio.Queue()
        long = kiln.SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
        client.submit(Submission("c", prompt, long, frozenset(), queue.put_nowait))
        await asyncio.wait_for(queue.get(), 60)  # it is running and holds blocks
        assert client.stats.blocks_used > 0
        client.abort("c")
        for _ in range(500):
            if client.idle and client.stats.blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        assert client.idle and client.stats[1:] == (0, 0, 0, 0)  # no request, sequence or block left
        assert side.end(client) == 0

    asyncio.run(run())


def test_a_request_the_scheduler_refuses_is_a_400(llm):
    side = EngineThread(llm)
    side.thread.start()

    async def run() -> None:
        client = side.client()
        await client.wait_ready()
        too_long = [5] * (llm.build.max_seq_len + 8)  # the server refuses it first; the engine's own check says why
        got = await collect(client, "big", too_long, kiln.SamplingParams(max_tokens=4), frozenset())
        assert isinstance(got, APIError) and got.status == 400, got
        assert got.message.startswith("the prompt has") and "max_model_len" in got.message
        assert client.num_requests == 0
        assert side.end(client) == 0

    asyncio.run(run())


class _Blocks:
    num_blocks = num_free_blocks = 4


class _Scheduler:
    block_manager = _Blocks()
    num_running = num_waiting = 0


class BrokenEngine:
    """An engine that takes requests and whose step raises, as a lost device would."""

    scheduler = _Scheduler()

    def __init__(self) -> None:
        self.added, self.ids = [], iter(range(10**6))

    def new_seq_id(self) -> int:
        return next(self.ids)

    def add(self, seq) -> None:
        self.added.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.added)

    def abort(self, seq_id: int) -> None:
        self.added = [s for s in self.added if s.seq_id != seq_id]

    def step(self):
        raise RuntimeError("device lost")


class FakeLLM:
    def __init__(self) -> None:
        self.engine, self.tokenizer, self.closed = BrokenEngine(), None, False

    def close(self) -> None:
        self.closed = True


def test_a_step_that_raises_ends_every_request_with_a_500():
    llm = FakeLLM()
    side = EngineThread(llm)
    side.thread.start()

    async def run() -> None:
        client = side.client()
        await client.wait_ready()
        assert client.blocks_total == 4
        params = kiln.SamplingParams(max_tokens=4, n=2)
        first, second = await asyncio.gather(collect(client, "x", [1, 2], params, frozenset()),
                                             collect(client, "y", [3], params, frozenset()))
        for got in (first, second):
            assert isinstance(got, APIError) and got.status == 500
            assert got.message == "the engine failed (RuntimeError); see the server log"
        assert client.failed == "RuntimeError" and client.num_requests == 0
        late = await collect(client, "z", [4], params, frozenset())  # after the failure: at once, no hang
        assert isinstance(late, APIError) and late.status == 500
        side.thread.join(30)
        assert side.status == [1] and llm.closed

    asyncio.run(run())


class RecordingEngine(BrokenEngine):
    """Takes every request and never has work: what arrives is what was sent."""

    def has_unfinished(self) -> bool:
        return False


def test_commands_larger_than_the_pipe_do_not_block_the_event_loop():
    llm = FakeLLM()
    llm.engine = RecordingEngine()
    side = EngineThread(llm)
    prompts = [list(range(i, i + 300_000)) for i in range(4)]  # ~1.2 MB each pickled: more than the pipe holds

    async def run() -> None:
        client = side.client()
        params = kiln.SamplingParams(max_tokens=1)
        for i, prompt in enumerate(prompts):  # nobody reads yet: the writes must not block
            client.submit(Submission(str(i), prompt, params, frozenset(), lambda item: None))
        assert client.outbox.pending
        side.thread.start()
        await client.wait_ready()
        for _ in range(1000):
            if client.stats.handled == len(prompts):
                break
            await asyncio.sleep(0.01)
        assert client.stats.handled == len(prompts) and client.failed is None
        assert [s.prompt_token_ids for s in llm.engine.added] == prompts
        assert not client.outbox.pending
        assert side.end(client) == 0

    asyncio.run(run())


def test_the_runtime_flags_reach_the_engine_process_settings():
    from kiln.serve.engine_process import EngineSettings
    from kiln.serve.state import ServeConfig, ServerState

    config = ServeConfig(engine_dir="E", tokenizer_dir="T", device="cuda:1", kv_cache_free_gpu_memory_fraction=0.5,
                         kv_cache_max_tokens=4096, use_cuda_graphs=False, async_scheduling=False, warm_up=False)
    state = ServerState(config)
    try:
        assert state.engine_settings() == EngineSettings("E", "T", "cuda:1", 0.5, 4096, False, False, False)
    finally:
        state.tokenize_pool.shutdown()


@pytest.mark.parametrize("flags, warm", [([], True), (["--no_warmup"], False)])
def test_kiln_serve_warms_up_unless_told_not_to(tmp_path_factory, monkeypatch, flags, warm):
    import kiln.serve.server
    from kiln.cli.main import main as kiln_main

    engine = shared_mpt_books_engine(tmp_path_factory)
    seen = []
    monkeypatch.setattr(kiln.serve.server, "serve", lambda config, log_level: seen.append(config) or 0)
    from fixtures_serve import free_port

    assert kiln_main(["serve", "--engine_dir", str(engine), "--port", str(free_port()), *flags]) == 0
    assert seen[0].warm_up is warm and seen[0].engine_dir == str(engine)
