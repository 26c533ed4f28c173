"""kiln serve refuses bad requests with OpenAI's error body and the right status, never a traceback: 400 for bad
JSON, wrong types, out-of-range values and prompts over the engine's limits (the limit in the message), 401 without
the key, 404 for another model, 413 for a 10 MB body, 429 when the queue is full (and serving again after)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from fixtures_serve import (MAX_INPUT_LEN, MAX_SEQ_LEN, LiveServer, free_port, live_server,
                            shared_mpt_books_engine)
from kiln.serve.state import ServeConfig

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return shared_mpt_books_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def server(engine):
    with live_server(engine, api_key=KEY, device="cpu", max_request_bytes=4 * 2**20,
                     chat_template=str(engine.parent / "chat.jinja")) as s:
        yield s


def call(server, path, body=None, key=KEY, raw=None, method=None):
    """(status, decoded body) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=data, headers=headers,
                                 method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        assert "Traceback" not in text and 'File "' not in text
        return err.code, json.loads(text)


def assert_error(status_body, status, *words, param=None):
    got, body = status_body
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param


def completion(**fields):
    return {"model": "mpt-books", "prompt": "Hello there", "max_tokens": 4, **fields}


@pytest.mark.parametrize("body,param,words", [
    ({"model": "mpt-books"}, "prompt", ["prompt"]),
    (completion(max_tokens="x"), "max_tokens", ["integer"]),
    (completion(max_tokens=0), "max_tokens", [">= 1"]),
    (completion(temperature=-1), "temperature", [">= 0"]),
    (completion(temperature="hot"), "temperature", []),
    (completion(top_p=0), "top_p", ["(0, 1]"]),
    (completion(top_k=-5), "top_k", []),
    (completion(min_p=1.5), "min_p", []),
    (completion(n=0), "n", []),
    (completion(n=True), "n", []),
    (completion(logprobs=50), "logprobs", ["20"]),
    (completion(presence_penalty=3), "presence_penalty", []),
    (completion(repetition_penalty=0), "repetition_penalty", []),
    (completion(stop=[""]), "stop", []),
    (completion(seed=-1), "seed", []),
    (completion(stream="yes"), "stream", []),
    (completion(best_of=3), "best_of", ["best_of"]),
    (completion(logit_bias={"5": 101}), "logit_bias", ["100"]),
    (completion(logit_bias={"x": 1}), "logit_bias", []),
    (completion(logit_bias={"99999999": 1}), "prompt", ["vocabulary"]),
    (completion(echo=True, logprobs=1), "echo", []),
    (completion(n=300), "n", ["256"]),
    (completion(prompt=[5, 99999999]), "prompt", ["vocabulary"]),
    (completion(prompt=[]), "prompt", []),
    (completion(max_tokens=MAX_SEQ_LEN), "max_tokens", [str(MAX_SEQ_LEN)]),
])
def test_bad_completion_requests_are_400(server, body, param, words):
    assert_error(call(server, "/v1/completions", body), 400, *words, param=param)


@pytest.mark.parametrize("body,words", [
    ({"model": "mpt-books", "messages": []}, ["messages"]),
    ({"model": "mpt-books", "messages": [{"role": "user"}]}, ["content"]),
    ({"model": "mpt-books", "messages": "hi"}, ["messages"]),
    ({"model": "mpt-books", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, ["logprobs"]),
    ({"model": "mpt-books", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     ["tools"]),
    ({"model": "mpt-books", "messages": [{"role": "user", "content": "hi"}], "response_format":
      {"type": "json_object"}}, ["response_format"]),
])
def test_bad_chat_requests_are_400(server, body, words):
    assert_error(call(server, "/v1/chat/completions", body), 400, *words)


def test_chat_without_a_chat_format_says_how_to_give_one(engine):
    with live_server(engine, device="cpu") as server:
        body = {"model": "mpt-books", "messages": [{"role": "user", "content": "hi"}]}
        assert_error(call(server, "/v1/chat/completions", body, key=None), 400, "--chat_template")


def test_bad_json_and_non_object_bodies(server):
    assert_error(call(server, "/v1/completions", raw=b'{"prompt": '), 400, "not valid JSON")
    assert_error(call(server, "/v1/completions", raw=b"\xff\xfe"), 400, "not valid JSON")
    assert_error(call(server, "/v1/completions", [1, 2]), 400, "JSON object")


def test_prompt_of_100k_tokens_names_the_limit(server):
    assert_error(call(server, "/v1/completions", completion(prompt=" hello" * 100_000)), 400, str(MAX_INPUT_LEN),
                 "max_input_len", param="prompt")
    assert_error(call(server, "/v1/completions", completion(prompt=[7] * 100_000)), 400, str(MAX_INPUT_LEN))


def test_ten_megabyte_body_is_refused_unread(server):
    body = json.dumps(completion(prompt="x" * (10 * 2**20))).encode()
    assert_error(call(server, "/v1/completions", raw=body), 413, str(4 * 2**20), "--max_request_bytes")


def test_api_key_model_name_and_unknown_paths(server):
    assert_error(call(server, "/v1/completions", completion(), key=None), 401, "API key")
    assert_error(call(server, "/v1/models", key="wrong"), 401)
    assert call(server, "/health", key=None)[0] == 200  # only /v1/* needs the key
    assert_error(call(server, "/v1/completions", completion(model="gpt-4")), 404, "mpt-books", param="model")
    assert_error(call(server, "/v1/nothing-here"), 404)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="mpt-books", prompt="hi", max_tokens=1)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="mpt-books", prompt="hi", max_tokens=1, top_p=7)
    assert call(server, "/v1/completions", completion())[0] == 200  # and it still serves


def test_full_queue_answers_429_then_recovers(engine):
    with live_server(engine, device="cpu", max_concurrent_requests=1, max_queue=1) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        running = client.completions.create(model="mpt-books", prompt="Once upon a time", max_tokens=300,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
        first = next(iter(running))  # the first request holds the only running slot
        assert first.choices[0].finish_reason is None
        queued: list = []
        waiter = threading.Thread(target=lambda: queued.append(client.completions.create(
            model="mpt-books", prompt="The sea", max_tokens=3, temperature=0)))
        waiter.start()
        for _ in range(200):
            if server.state.admission.waiting == 1:
                break
            threading.Event().wait(0.02)
        assert server.metric("kiln_queue_length") == 1
        with pytest.raises(openai.RateLimitError, match="queue"):
            client.completions.create(model="mpt-books", prompt="one too many", max_tokens=3)
        running.close()  # the client leaves: its request is aborted, the queued one runs
        waiter.join(60)
        assert queued and queued[0].choices[0].finish_reason == "length"
        server.wait_idle()
        again = client.completions.create(model="mpt-books", prompt="recovered", max_tokens=3)
        assert again.usage.completion_tokens == 3


def test_503_while_loading_then_200(engine, monkeypatch):
    from kiln.serve.state import ServerState

    release = threading.Event()
    load = ServerState._load_model  # the server's part of loading (config, tokenizer) is held back
    monkeypatch.setattr(ServerState, "_load_model", lambda self: (release.wait(60), load(self))[1])
    server = LiveServer(ServeConfig(engine_dir=str(engine), port=free_port(), served_model_name="mpt-books",
                                    device="cpu"))
    server.thread.start()
    try:
        for _ in range(200):
            try:
                status = call(server, "/health", key=None)
                break
            except urllib.error.URLError:  # not listening yet
                threading.Event().wait(0.05)
        assert status == (503, {"status": "loading"})
        assert_error(call(server, "/v1/completions", completion(), key=None), 503, "loading")
        release.set()
        server.start()
        assert call(server, "/v1/completions", completion(), key=None)[0] == 200
    finally:
        release.set()
        server.stop()


def test_a_stop_while_loading_ends_the_engine_process(engine, monkeypatch):
    """SIGTERM (here: uvicorn's exit) while the engine loads: the load is cancelled and the engine process ends at
    once, without waiting for the load to finish."""
    from kiln.serve.state import ServerState

    release = threading.Event()
    load = ServerState._load_model
    monkeypatch.setattr(ServerState, "_load_model", lambda self: (release.wait(60), load(self))[1])
    server = LiveServer(ServeConfig(engine_dir=str(engine), port=free_port(), device="cpu"))
    server.thread.start()
    try:
        for _ in range(400):
            if server.state.engine is not None:
                break
            threading.Event().wait(0.02)
        process = server.state.engine.process
        server.server.should_exit = True
        # Polled, not joined: the server's own join reaps the process, and two threads joining one process race
        # (the loser's waitpid finds no child and reads no exit code).
        deadline = time.monotonic() + 10
        while process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.exitcode == -signal.SIGKILL  # killed: a loading engine is not waited for
        assert server.state.status == "stopping"
    finally:
        release.set()
        server.stop()


def test_an_engine_that_cannot_load_is_a_failed_load_with_its_reason(engine):
    """The engine process refuses to load (a KV cache too small for one sequence): its one-line reason reaches the
    server, /health says failed, requests get 503 naming it, and the engine process has exited."""
    server = LiveServer(ServeConfig(engine_dir=str(engine), port=free_port(), device="cpu", kv_cache_max_tokens=16))
    try:
        with pytest.raises(RuntimeError, match="too little memory for the KV cache"):
            server.start()
        assert call(server, "/health", key=None) == (503, {"status": "failed"})
        assert_error(call(server, "/v1/completions", completion(), key=None), 503, "KV cache")
        server.state.engine.process.join(30)
        assert server.state.engine.process.exitcode == 0
    finally:
        server.stop()


def test_an_engine_process_that_dies_is_a_500_without_traceback_and_health_503(engine):
    """The engine process killed mid-request: the request in flight (streamed and whole) ends with the 500 error
    body, /health turns 503, and the server still answers (503) instead of hanging. (An engine whose step raises is
    test_serve_engine_process.py's, without HTTP.)"""
    with live_server(engine, device="cpu") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(model="mpt-books", prompt="It was", max_tokens=350, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))  # a request is in flight in the engine
        assert first.choices[0].finish_reason is None
        whole: list = []
        waiter = threading.Thread(target=lambda: whole.append(call(server, "/v1/completions", completion(
            max_tokens=350, ignore_eos=True), key=None)))
        waiter.start()
        for _ in range(200):
            if server.state.engine.num_requests == 2:
                break
            threading.Event().wait(0.02)
        process = server.state.engine.process
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine failed"):
            for _ in stream:
                pass
        waiter.join(60)
        assert_error(whole[0], 500, "engine failed")
        assert call(server, "/health", key=None)[0] == 503
        assert_error(call(server, "/v1/completions", completion(), key=None), 503, "not serving")
        assert call(server, "/v1/models", key=None)[0] == 200  # the rest of the server still answers
        assert process.exitcode == -signal.SIGKILL


def reachable(root: object) -> list:
    """Every object reachable from `root` through containers and instances (not through modules, classes or
    functions, which would reach the whole interpreter)."""
    import gc
    import types

    opaque = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.FrameType)
    seen, found, stack = set(), [], [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, opaque):
            continue
        seen.add(id(obj))
        found.append(obj)
        stack.extend(gc.get_referents(obj))
    return found


def test_the_server_process_holds_no_weights(server):
    """The model's weights live in the engine process only: the server's state (and all it reaches: the event
    loop, the app, the engine client) holds the engine's config and tokenizer, and no kiln.LLM, module or tensor."""
    import torch

    from kiln.llm import LLM

    state = server.state
    assert state.model.tokenizer is not None and state.model.build.max_seq_len == MAX_SEQ_LEN
    assert set(vars(state.model)) == {"info", "tokenizer"}
    assert state.engine.process.is_alive() and state.engine.process.pid != os.getpid()
    heavy = (LLM, torch.nn.Module, torch.Tensor)
    held = [type(o).__name__ for o in reachable(server.server) if isinstance(o, heavy)]
    assert not held, held
    planted = type("Holder", (), {})()
    planted.table = {"layers": [torch.nn.Linear(2, 2)]}
    assert any(isinstance(o, torch.nn.Parameter) for o in reachable(planted))  # the walk would see weights


def test_kiln_serve_bad_flags_are_one_line_exit_2(engine, tmp_path, capsys):
    from kiln.cli.main import main as kiln_main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cases = [["--engine_dir", str(tmp_path / "nothing")],
                 ["--engine_dir", str(engine), "--port", "70000"],
                 ["--engine_dir", str(engine), "--max_queue", "0"],
                 ["--engine_dir", str(engine), "--chat_template", str(tmp_path / "none.jinja")],
                 ["--engine_dir", str(engine), "--port", str(taken.getsockname()[1])]]
        for flags in cases:
            assert kiln_main(["serve", *flags]) == 2, flags
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("kiln serve: error:"), err
    finally:
        taken.close()
