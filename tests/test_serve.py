"""kiln serve through the official openai client against a live server on the shipped mpt-books model (float32,
CPU): completions and chat, whole and streamed, equal to kiln.LLM's offline outputs; n > 1, seeds, logprobs, stop
strings, usage; /tokenize, /detokenize, /models, /version, /health, /metrics."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

import kiln
from fixtures_serve import CHAT_TEMPLATE, shared_mpt_books_engine, live_server

PROMPTS = ["Call me Ishmael. Some years ago,", "It was a fine morning in June, and Elizabeth",
           "The sea was calm and", "She said that"]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where is the ship?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return shared_mpt_books_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def llm(engine):
    llm = kiln.LLM(engine, device="cpu")
    llm.tokenizer.set_chat_template(CHAT_TEMPLATE)
    return llm


@pytest.fixture(scope="module")
def server(engine):
    with live_server(engine, chat_template=str(engine.parent / "chat.jinja"), device="cpu") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def offline(llm, prompt, **params):
    return llm.generate([prompt], kiln.SamplingParams(**params))[0].outputs


def chosen_logprobs(out) -> list[float]:
    """The logprob of each generated token from kiln.LLM's output, whether it holds floats or vLLM-style dicts
    {token id: Logprob} (the offline API's output shape is being changed to vLLM's on another branch)."""
    rows = list(out.logprobs)
    if rows and isinstance(rows[0], dict):
        return [float(getattr(row[t], "logprob", row[t])) for row, t in zip(rows, out.token_ids)]
    return [float(x) for x in rows]


def stream_text(stream, n=1):
    texts, reasons = [""] * n, [None] * n
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text if hasattr(c, "text") and c.text is not None else (c.delta.content or "") \
                if hasattr(c, "delta") else ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    return texts, reasons


def test_greedy_completions_equal_llm_generate_whole_and_streamed(client, llm):
    for prompt in PROMPTS:
        want = offline(llm, prompt, max_tokens=24, temperature=0)[0]
        got = client.completions.create(model="mpt-books", prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason
        prompt_len = len(llm.encode(prompt))
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_len, len(want.token_ids))
        stream = client.completions.create(model="mpt-books", prompt=prompt, max_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_prompt_forms_batch_and_token_ids(client, llm):
    ids = llm.encode(PROMPTS[0])
    want = [offline(llm, p, max_tokens=8, temperature=0)[0].text for p in PROMPTS[:2]]
    batch = client.completions.create(model="mpt-books", prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == want
    by_ids = client.completions.create(model="mpt-books", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == want[0]
    echo = client.completions.create(model="mpt-books", prompt=PROMPTS[0], max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[0] + want[0]


def test_chat_whole_and_streamed_equal_llm_chat(client, llm):
    want = llm.chat(CHAT, kiln.SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
    got = client.chat.completions.create(model="mpt-books", messages=CHAT, max_tokens=20, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(model="mpt-books", messages=CHAT, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_n_samples_with_seed_are_reproducible_and_match_offline(client, llm):
    args = dict(model="mpt-books", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=7)
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # three samples, not one sample three times
    want = [o.text for o in offline(llm, PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=7)]
    assert texts == want
    streamed, _ = stream_text(client.completions.create(**args, stream=True), n=3)
    assert streamed == want
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in
                                                offline(llm, PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.9,
                                                        n=3, seed=7))


def test_logprobs_completions_and_chat(client, llm):
    want = offline(llm, PROMPTS[2], max_tokens=6, temperature=0, logprobs=3)[0]
    got = client.completions.create(model="mpt-books", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(chosen_logprobs(want), abs=1e-5)
    assert len(lp.tokens) == 6 and all(len(row) <= 3 for row in lp.top_logprobs)
    for chosen, row in zip(lp.token_logprobs, lp.top_logprobs):
        assert max(row.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: the chosen token is the most likely
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == got.choices[0].text
    chat = client.chat.completions.create(model="mpt-books", messages=CHAT, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-4) for c in content)
    streamed = client.chat.completions.create(model="mpt-books", messages=CHAT, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True)
    rows = [item for c in streamed if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [r.logprob for r in rows] == pytest.approx([c.logprob for c in content], abs=1e-5)


def test_stop_strings_cut_the_text_whole_and_streamed(client, llm):
    full = offline(llm, PROMPTS[0], max_tokens=30, temperature=0)[0].text
    stop = full[10:14]
    assert stop.strip(), full
    want = full[:full.find(stop)]
    got = client.completions.create(model="mpt-books", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want, "stop")
    texts, reasons = stream_text(client.completions.create(model="mpt-books", prompt=PROMPTS[0], max_tokens=30,
                                                           temperature=0, stop=stop, stream=True))
    assert (texts[0], reasons[0]) == (want, "stop")  # the stream never showed the stop string's first characters
    assert got.choices[0].text == offline(llm, PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])[0].text
    kept = client.completions.create(model="mpt-books", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == want + stop


def test_sampling_extras_through_extra_body(client, llm):
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3}
    got = client.completions.create(model="mpt-books", prompt=PROMPTS[3], max_tokens=10, temperature=0.8, seed=3,
                                    presence_penalty=0.5, frequency_penalty=0.5, extra_body=extra)
    want = offline(llm, PROMPTS[3], max_tokens=10, temperature=0.8, seed=3, presence_penalty=0.5,
                   frequency_penalty=0.5, **extra)[0]
    assert got.choices[0].text == want.text


def test_logit_bias_steers_sampling_as_offline(client, llm):
    forced = llm.encode(" ship")[-1]
    got = client.completions.create(model="mpt-books", prompt=PROMPTS[2], max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100})
    assert got.choices[0].text == " ship" * 4  # +100 on one token's logit makes it the greedy choice every step
    first = offline(llm, PROMPTS[2], max_tokens=1, temperature=0)[0].token_ids[0]
    banned = client.completions.create(model="mpt-books", prompt=PROMPTS[2], max_tokens=6, temperature=0,
                                       logit_bias={str(first): -100}, logprobs=0)
    assert banned.choices[0].text == offline(llm, PROMPTS[2], max_tokens=6, temperature=0,
                                             logit_bias={first: -100})[0].text
    assert llm.encode(banned.choices[0].logprobs.tokens[0])[-1] != first


def _post(server, path, body):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_models_tokenize_detokenize_version_health_metrics(client, server, llm):
    assert [m.id for m in client.models.list().data] == ["mpt-books"]
    tok = _post(server, "/tokenize", {"prompt": PROMPTS[0]})
    assert tok["tokens"] == llm.encode(PROMPTS[0]) and tok["count"] == len(tok["tokens"])
    assert _post(server, "/detokenize", {"tokens": tok["tokens"]})["prompt"] == llm.tokenizer.decode(tok["tokens"])
    with urllib.request.urlopen(server.url + "/version") as r:
        assert json.loads(r.read())["version"] == kiln.__version__
    with urllib.request.urlopen(server.url + "/health") as r:
        assert r.status == 200
    client.completions.create(model="mpt-books", prompt="a", max_tokens=2)
    assert server.metric("kiln_generation_tokens_total") > 0
    assert server.metric("kiln_time_to_first_token_seconds_count") > 0
    assert server.metric("kiln_kv_blocks_total") > 0
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    assert 'kiln_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "kiln_inter_token_latency_seconds_bucket" in text and "kiln_queue_length" in text


def _engine_counters(server) -> dict[str, float]:
    """The kiln_engine_* samples of /metrics, by 'name{labels}'."""
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("kiln_engine_")}


def test_metrics_count_the_engine_steps_by_kind(client, server):
    """kiln_engine_*_total (the engine process's LLMEngine.step_stats) grow with a request: its prefill, its decodes
    and their host time; the engine sends them when it goes idle."""
    server.wait_idle()
    before = _engine_counters(server)
    for kind in ("decode_graph", "decode_eager", "prefill", "mixed", "drain", "idle"):
        for name in ("steps", "step_seconds", "step_sequences", "step_prefill_tokens"):
            assert f'kiln_engine_{name}_total{{kind="{kind}"}}' in before
    assert "kiln_engine_between_steps_seconds_total" in before
    client.completions.create(model="mpt-books", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    server.wait_idle()
    after = _engine_counters(server)

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew('kiln_engine_steps_total{kind="prefill"}') >= 1
    assert grew('kiln_engine_steps_total{kind="decode_eager"}') >= 1  # CPU: no graphs
    assert grew('kiln_engine_steps_total{kind="decode_graph"}') == 0
    assert grew('kiln_engine_step_prefill_tokens_total{kind="prefill"}') >= 8
    assert grew('kiln_engine_step_seconds_total{kind="prefill"}') > 0
    assert grew('kiln_engine_step_seconds_total{kind="decode_eager"}') > 0
    steps = sum(grew(name) for name in after if name.startswith("kiln_engine_steps_total"))
    assert steps == 6  # one call per token (async: prefill + first decode in one call, then a drain)
