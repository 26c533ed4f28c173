"""kiln serve on a GPU: the engine process (spawned, CUDA graphs and async scheduling on) streams the greedy text
kiln.LLM gives on the same GPU, several streams at once; killing the engine process ends the request in flight with
the 500 body while the server stays up."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import openai
import pytest
import torch

import kiln
from fixtures_serve import live_server, shared_mpt_books_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["Call me Ishmael. Some years ago,", "It was a fine morning in June, and Elizabeth",
           "The sea was calm and", "She said that"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return shared_mpt_books_engine(tmp_path_factory)


def offline_texts(engine, max_tokens: int) -> list[str]:
    """One prompt at a time (the served requests below run alone too: the same batch shapes), then the GPU memory
    is given back for the engine process."""
    llm = kiln.LLM(engine, device="cuda")
    texts = [llm.generate([p], kiln.SamplingParams(max_tokens=max_tokens, temperature=0))[0].outputs[0].text
             for p in PROMPTS]
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return texts


def test_served_on_cuda_equals_offline_and_survives_a_dead_engine(engine):
    want = offline_texts(engine, 24)
    with live_server(engine, device="cuda") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for prompt, text in zip(PROMPTS, want):
            stream = client.completions.create(model="mpt-books", prompt=prompt, max_tokens=24, temperature=0,
                                               stream=True)
            assert "".join(c.choices[0].text for c in stream if c.choices) == text

        async def together() -> list[int]:
            aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            got = await asyncio.gather(*(aclient.completions.create(model="mpt-books", prompt=p, max_tokens=24,
                                                                   temperature=0) for p in PROMPTS * 8))
            await aclient.close()
            return [g.usage.completion_tokens for g in got]

        assert all(n > 0 for n in asyncio.run(together()))
        server.wait_idle()
        stream = client.completions.create(model="mpt-books", prompt=PROMPTS[0], max_tokens=300, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        os.kill(server.state.engine.process.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine failed"):
            for _ in stream:
                pass
        assert not server.state.healthy
