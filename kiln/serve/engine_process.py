"""The engine in a process of its own: it loads kiln.LLM and drives a StepLoop, talking to the server over two pipes.

Why a process: the server's HTTP work (~60 us of Python per streamed token: asyncio, uvicorn, JSON) and the engine's
step loop (scheduling, launching, detokenizing a batch) each need a core's worth of Python at saturation; in one
process they take turns on one GIL and the GPU waits for the loser. vLLM moved its engine core out for this reason.

Commands, server -> engine (pickled tuples, in order):
    ("add", request_id, prompt_ids, SamplingParams, stop_ids)   ("abort", request_id)   ("abort_all",)
Messages, engine -> server:
    ("ready", kv_blocks_total)   ("load_error", text)   ("failed", exception name)
    ("out", [(request_id, [Delta as a plain tuple, ...]), ...], [(request_id, why refused), ...], EngineStats,
     step stats or None)
        -- one per step (and one after commands that changed the stats); the step stats (StepStats.summary(), for
        /metrics) come at most every STEP_STATS_INTERVAL_S while busy, and once more when it goes idle
The commands pipe closing (the server stopped, or died) is the engine's stop: it frees the engine (and its rank
processes) and exits.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from kiln.engine.warmup import warm_up
from kiln.serve.step_loop import Delta, StepLoop

logger = logging.getLogger(__name__)
PIPE_BYTES = 2**20  # each pipe's kernel buffer: a burst of prompts, or of steps' outputs, passes without blocking
# How stale /metrics' step counters may be while the engine is busy: a summary is a few dozen numbers to pickle, too
# many for every step but nothing once a second. When the engine goes idle they are sent at once (exact when idle).
STEP_STATS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class EngineSettings:
    """What the engine process loads: kiln.LLM's arguments as `kiln serve` passes them."""

    engine_dir: str
    tokenizer_dir: str | None = None
    device: str | None = None
    kv_cache_free_gpu_memory_fraction: float = 0.9
    kv_cache_max_tokens: int | None = None
    use_cuda_graphs: bool = True
    async_scheduling: bool = True
    warm_up: bool = True  # on a GPU, one prefill step per token bucket before ready (kiln.engine.warmup)


def start_engine_process(settings: EngineSettings) -> tuple[multiprocessing.process.BaseProcess, Connection,
                                                            Connection]:
    """Start the engine process; returns it, the commands pipe's write end and the messages pipe's read end.

    "spawn": a fresh interpreter (CUDA cannot be forked), which imports the caller's __main__ again unless it is a
    module run with -m (a script that starts a server needs the usual `if __name__ == "__main__":` guard). Not
    daemonic: a multi-rank engine starts its own rank processes."""
    ctx = multiprocessing.get_context("spawn")
    commands_in, commands_out = ctx.Pipe(duplex=False)
    events_in, events_out = ctx.Pipe(duplex=False)
    for conn in (commands_out, events_out):
        _grow_pipe(conn)
    process = ctx.Process(target=engine_main, args=(commands_in, events_out, settings), name="kiln-engine",
                          daemon=False)
    process.start()
    # The child has its own copies: closing ours lets each side see the other's end close (EOF) when it exits.
    commands_in.close()
    events_out.close()
    return process, commands_out, events_in


def _grow_pipe(conn: Connection) -> None:
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):  # not Linux, or above the system's pipe-max-size: keep the default
        pass


def engine_main(commands: Connection, events: Connection, settings: EngineSettings) -> None:
    """The engine process: load, say ready (or why not), serve commands until the server's pipe closes."""
    # Ctrl-C in a terminal, and a service manager's SIGTERM to the whole group, reach this process too: the server
    # decides how to stop (graceful, then closing the pipe), so both are ignored here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        llm = load_llm(settings)
        if settings.warm_up and llm.device.type == "cuda":
            warm_up(llm)  # every prefill tile compiled before the server says ready, not mid-stream
            llm.engine.step_stats.reset()  # /metrics counts the steps of served requests only
    except Exception as err:  # a one-line reason for the server to show (a ConfigError, a rank that failed, OOM)
        _send_quietly(events, ("load_error", str(err) or type(err).__name__))
        return
    gc.collect()
    gc.freeze()  # the loaded engine's objects leave the collector's scans: fewer, shorter pauses between steps
    raise SystemExit(serve_engine(llm, commands, events))


def serve_engine(llm: Any, commands: Connection, events: Connection) -> int:
    """Say ready, then serve commands; 0 when the server closed the pipe, 1 when the engine failed (the server is
    told which exception, the traceback goes to this process's log). The LLM is closed (its ranks stopped) either
    way."""
    try:
        events.send(("ready", llm.engine.scheduler.block_manager.num_blocks))
        serve_commands(StepLoop(llm.engine, llm.tokenizer), commands, events)
    except (EOFError, BrokenPipeError):  # the server is gone, or stopped us by closing the pipe
        return 0
    except BaseException as err:
        logger.exception("the engine loop failed")
        _send_quietly(events, ("failed", type(err).__name__))
        return 1
    finally:
        llm.close()
    return 0


def load_llm(settings: EngineSettings) -> Any:
    from kiln.llm import LLM

    s = settings
    return LLM(s.engine_dir, tokenizer_dir=s.tokenizer_dir, device=s.device,
               kv_cache_free_gpu_memory_fraction=s.kv_cache_free_gpu_memory_fraction,
               use_cuda_graphs=s.use_cuda_graphs, async_scheduling=s.async_scheduling,
               kv_cache_max_tokens=s.kv_cache_max_tokens)


def serve_commands(core: StepLoop, commands: Connection, events: Connection) -> None:
    """Until the commands pipe closes (EOFError): take every command that has arrived, run one step when there is
    work, and send the step's outputs with the engine's stats as one message (also after commands alone, when they
    changed the stats: an abort frees blocks without a step). Idle, it sleeps in poll() until a command comes. The
    engine's step stats ride along every STEP_STATS_INTERVAL_S while busy, and once more when it goes idle."""
    handled, last = 0, None
    steps_sent, unsent = time.monotonic(), False
    while True:
        refused: list[tuple[str, str]] = []
        if commands.poll(None if not core.busy else 0):
            while True:
                handled += 1
                why = _apply(core, commands.recv())
                if why is not None:
                    refused.append(why)
                if not commands.poll(0):
                    break
        stepped = core.busy
        outputs = core.step() if stepped else []
        unsent = unsent or stepped  # steps ran since the step stats were last sent
        stats = core.stats(handled)
        steps = None
        if unsent and (not core.busy or time.monotonic() - steps_sent >= STEP_STATS_INTERVAL_S):
            steps, steps_sent, unsent = core.step_stats(), time.monotonic(), False
        if outputs or refused or stats != last or steps is not None:
            events.send(("out", _plain(outputs), refused, stats, steps))
            last = stats


def _plain(outputs: list[tuple[str, list[Delta]]]) -> list[tuple[str, list[tuple]]]:
    """Deltas as plain tuples for the pipe: a named tuple pickles through a Python-level __getnewargs__, 4x slower
    (70 against 16 us for a step of 64 sequences); the client makes them Deltas again."""
    return [(request_id, [tuple(d) for d in deltas]) for request_id, deltas in outputs]


def _apply(core: StepLoop, command: tuple) -> tuple[str, str] | None:
    """One command; (request id, reason) for an add the engine refuses."""
    kind = command[0]
    if kind == "add":
        _, request_id, prompt_ids, params, stop_ids = command
        why = core.add(request_id, prompt_ids, params, stop_ids)
        return None if why is None else (request_id, why)
    if kind == "abort":
        core.abort(command[1])
    elif kind == "abort_all":
        core.abort_all()
    else:
        raise ValueError(f"unknown engine command {kind!r}")
    return None


def _send_quietly(events: Connection, message: tuple) -> None:
    try:
        events.send(message)
    except OSError:  # the server is gone: nobody to tell
        pass
