"""kiln serve under load, on the shipped mpt-books model: 64 concurrent streaming clients each get their offline
output; clients that disconnect mid-stream, mid-prefill or while waiting abort their requests and every KV block
comes back; SIGTERM stops a `kiln serve` process with exit 0; `kiln serve` without its extra says how to install
it; a short soak of mixed load with random disconnects ends with no errors and no blocks held."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
import urllib.request

import openai
import pytest

import kiln
from fixtures_serve import REPO, children, live_server, shared_mpt_books_engine, start_kiln_serve, wait_gone
from kiln.cli.main import main as kiln_main

WORDS = ["ship", "sea", "morning", "letter", "house", "garden", "storm", "captain"]


def prompt_for(i: int) -> str:
    return f"The {WORDS[i % 8]} and the {WORDS[(i * 3 + 1) % 8]} were {i} miles from"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return shared_mpt_books_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def server(engine):
    with live_server(engine, device="cpu", max_queue=256) as s:
        yield s


async def stream_one(client, prompt: str, max_tokens: int) -> str:
    stream = await client.completions.create(model="mpt-books", prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True)
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


def test_64_concurrent_streams_each_equal_offline(server, engine):
    prompts = [prompt_for(i) for i in range(64)]
    llm = kiln.LLM(engine, device="cpu")
    want = [r.outputs[0].text for r in llm.generate(prompts, kiln.SamplingParams(max_tokens=8, temperature=0))]

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(stream_one(client, p, 8) for p in prompts))
        finally:
            await client.close()

    assert asyncio.run(run()) == want
    server.wait_idle()


async def raw_request(url: str, body: dict, read_bytes: int = 0, non_stream_wait: float = 0.0) -> None:
    """Send one request over a raw socket and hang up: right away (mid-prefill or queued), after `read_bytes` of the
    response (mid-stream), or after `non_stream_wait` seconds of a non-streamed request."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    if read_bytes:
        await reader.readexactly(read_bytes)
    if non_stream_wait:
        await asyncio.sleep(non_stream_wait)
    writer.close()
    await writer.wait_closed()


def test_disconnects_abort_and_free_every_block(server, engine):
    long = {"model": "mpt-books", "max_tokens": 350, "temperature": 0, "ignore_eos": True}
    before = server.metric("kiln_generation_tokens_total")

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        tasks = [raw_request(server.url, {**long, "prompt": prompt_for(i) * 8, "stream": True}) for i in range(8)]
        tasks += [raw_request(server.url, {**long, "prompt": prompt_for(i), "stream": True}, read_bytes=600)
                  for i in range(8, 16)]
        tasks += [raw_request(server.url, {**long, "prompt": prompt_for(i)}, non_stream_wait=0.3)
                  for i in range(16, 24)]
        survivor = stream_one(client, prompt_for(99), 6)
        results = await asyncio.gather(survivor, *tasks)
        await client.close()
        return results[0]

    survivor = asyncio.run(run())
    server.wait_idle()
    generated = server.metric("kiln_generation_tokens_total") - before
    assert generated < 24 * 350 / 4, generated  # the hung-up requests stopped long before their 350 tokens
    llm_text = kiln.LLM(engine, device="cpu").generate([prompt_for(99)],
                                                       kiln.SamplingParams(max_tokens=6, temperature=0))
    assert survivor == llm_text[0].outputs[0].text
    with urllib.request.urlopen(server.url + "/health") as r:
        assert r.status == 200


def test_a_reader_that_stops_reading_slows_no_one(server):
    """A client that asks for a long stream and never reads it: the engine keeps stepping (its queue grows, not the
    step time), another client's request completes, and hanging up frees everything."""
    body = json.dumps({"model": "mpt-books", "prompt": prompt_for(3), "max_tokens": 100, "temperature": 0.5, "n": 4,
                       "stream": True, "ignore_eos": True}).encode()
    before = server.metric("kiln_generation_tokens_total")

    async def run() -> str:
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=64)
        writer.transport.pause_reading()  # read nothing: what the server sends piles up in the socket buffers
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        other = await stream_one(client, prompt_for(4), 20)
        await client.close()
        deadline = time.monotonic() + 60
        while server.metric("kiln_generation_tokens_total") - before < 4 * 100 + 20:
            assert time.monotonic() < deadline, "the engine stalled behind a client that does not read"
            await asyncio.sleep(0.1)
        writer.close()
        return other

    assert len(asyncio.run(run())) > 0
    server.wait_idle()


def test_sigterm_stops_kiln_serve_with_exit_0(engine, tmp_path):
    proc, url = start_kiln_serve(engine, "--shutdown_timeout", "0")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        stream = client.completions.create(model=engine.name, prompt="It was", max_tokens=350, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # a request is in flight
        helpers = children(proc.pid)
        assert helpers, "the engine runs in a process of its own"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stdout.read().decode()
        assert not wait_gone(helpers), "kiln serve left a process behind"
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:  # no grace period: the request ends with the error as the stream's last event
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stdout.read().decode()


def test_a_killed_server_leaves_no_engine_behind(engine):
    """kill -9 of kiln serve: its engine process sees its pipe close and exits by itself."""
    proc, url = start_kiln_serve(engine)
    try:
        helpers = children(proc.pid)
        assert helpers
        proc.kill()
        proc.wait(timeout=30)
        assert not wait_gone(helpers, timeout=30), "the engine process outlived its server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_serve_measures_a_live_server(server, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_serve

    out = tmp_path / "serve.json"
    argv = ["--base_url", server.url, "--model", "mpt-books", "--vocab_size", "50432", "--num_prompts", "6",
            "--input_len", "8", "--output_len", "5", "--range_ratio", "0.5", "--request_rate", "50", "inf",
            "--output_json", str(out)]
    assert bench_serve.main(argv) == 0
    requested = sum(n for _, n in bench_serve.workload(bench_serve.parse_args(argv), 50432))
    rates = json.loads(out.read_text())["rates"]
    assert [r["request_rate"] for r in rates] == [50.0, float("inf")]
    for row in rates:
        assert row["completed"] == 6 and row["failed"] == 0
        assert round(row["output_throughput"] * row["duration_s"]) == requested  # ignore_eos: every token asked for
        assert 0 < row["p50_ttft_ms"] <= row["p99_ttft_ms"] and row["p50_ttft_ms"] <= row["p50_e2e_ms"]
        steps = row["step_stats"]  # the engine's step() calls of this rate's run, from /metrics
        kinds = steps["kinds"]
        assert steps["steps"] == sum(k["steps"] for k in kinds.values()) > 0
        assert kinds["prefill"]["steps"] + kinds["mixed"]["steps"] >= 1 and kinds["decode_eager"]["steps"] >= 1
        assert kinds["prefill"]["prefill_tokens"] + kinds["mixed"]["prefill_tokens"] == sum(
            len(p) for p, _ in bench_serve.workload(bench_serve.parse_args(argv), 50432))
    server.wait_idle()


def test_kiln_serve_without_the_extra_says_what_to_install(monkeypatch, capsys, engine):
    from kiln.cli import serve_cmd

    monkeypatch.setattr(serve_cmd, "missing_packages", lambda: ["fastapi", "uvicorn"])
    assert kiln_main(["serve", "--engine_dir", str(engine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'kiln[serve]'" in err[0]


@pytest.mark.slow
def test_soak_mixed_load_with_random_disconnects(server):
    """20 s of streamed and whole requests of mixed lengths, a quarter of them abandoned at random points."""
    rng = random.Random(5)

    async def one(client, i: int) -> int:
        prompt = prompt_for(i) * rng.randint(1, 6)
        max_tokens = rng.randint(1, 40)
        if rng.random() < 0.25:
            await raw_request(server.url, {"model": "mpt-books", "prompt": prompt, "max_tokens": 200,
                                           "stream": rng.random() < 0.5}, non_stream_wait=rng.random() * 0.2)
            return 0
        if rng.random() < 0.5:
            await stream_one(client, prompt, max_tokens)
            return 1
        got = await client.completions.create(model="mpt-books", prompt=prompt, max_tokens=max_tokens, n=2)
        assert len(got.choices) == 2 and got.usage.completion_tokens <= 2 * max_tokens
        return 1

    async def run() -> int:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        end, done, i = time.monotonic() + 20, 0, 0
        while time.monotonic() < end:
            batch = [one(client, i + k) for k in range(12)]
            i += 12
            done += sum(await asyncio.gather(*batch))
        await client.close()
        return done

    assert asyncio.run(run()) > 20
    server.wait_idle()
    assert server.state.engine.failed is None
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    assert 'status="500"' not in text and 'status="503"' not in text
