"""POST /v1/completions and /v1/chat/completions: parse, check, admit, generate, answer whole or as SSE."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.sampling_params import SamplingParams
from kiln.serve import protocol as P
from kiln.serve.errors import APIError, bad_request
from kiln.serve.generation import Generation
from kiln.serve.http_io import check_api_key, read_json, until_disconnect
from kiln.serve.responses import SSE_DONE, Choice, chat_logprobs, completion_logprobs, sse, usage
from kiln.serve.state import ServerState


@dataclass
class Job:
    """One admitted request: what to generate and how to answer."""

    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: list[str] | None = None  # completions' echo: each prompt's text
    top_logprobs: int = 0  # chat: how many alternatives per token


class SSEResponse(StreamingResponse):
    """A stream whose clean-up (abort the generation, free the slot) runs however the response ends, even if the
    body iterator never starts (the client left before the headers went out)."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


async def begin(request: Request, model: type) -> tuple[ServerState, Any]:
    state: ServerState = request.app.state.kiln
    check_api_key(request, state.config.api_key)
    state.require_ready()
    req = P.parse(model, await read_json(request, state.config.max_request_bytes))
    if req.model is not None and req.model != state.config.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server serves {state.config.model_name!r} "
                            "(GET /v1/models)", "model", "model_not_found")
    P.refuse_unsupported(req)
    return state, req


async def completions(request: Request) -> Response:
    state, req = await begin(request, P.CompletionRequest)
    prompts = P.prompt_list(req.prompt)
    P.check_choices(len(prompts), req.n)
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs needs the prompt's logprobs, which kiln does not return; drop one",
                          "echo")
    params = P.sampling_params(req, req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
    encoded = []
    for i, prompt in enumerate(prompts):
        ids = await state.encode(prompt)
        state.check_prompt(ids, params, "the prompt" if len(prompts) == 1 else f"prompt {i}")
        encoded.append(ids)
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else state.tokenizer.decode(p) if state.tokenizer else "" for p in prompts]
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await run_job(request, state, Job(False, encoded, params, req.stream, include, echo=echo))


async def chat_completions(request: Request) -> Response:
    state, req = await begin(request, P.ChatRequest)
    P.check_choices(1, req.n)
    tokenizer = state.need_tokenizer("chat")
    if not tokenizer.has_chat_format:
        raise bad_request("this model's tokenizer has no chat format; start kiln serve with --chat_template FILE "
                          "(a Jinja template) or send prompts to /v1/completions", "messages")
    ids = await state.off_loop(tokenizer.apply_chat_template, P.message_dicts(req.messages),
                               req.add_generation_prompt)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    top = req.top_logprobs or 0
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = state.default_max_tokens(len(ids))
    params = P.sampling_params(req, max_tokens, top if req.logprobs else None)
    state.check_prompt(ids, params, "the conversation")
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await run_job(request, state, Job(True, [ids], params, req.stream, include, top_logprobs=top))


async def run_job(request: Request, state: ServerState, job: Job) -> Response:
    """Wait for a running slot (429 when the queue is full), then generate; a client that leaves meanwhile aborts."""
    admission = state.admission
    admission.check()
    if not await until_disconnect(request, admission.enter()):
        return Response(status_code=499)  # nobody is listening; the status is for the log and the metrics
    try:
        gen = Generation(state.engine, job.prompts, [job.params] * len(job.prompts),
                         [state.model.stop_ids(job.params)] * len(job.prompts), state.metrics)
    except BaseException:
        admission.leave()
        raise

    def cleanup() -> None:
        gen.abort()
        admission.leave()

    ctx = Context(state, job, gen)
    if job.stream:
        return SSEResponse(ctx.stream(), cleanup)
    try:
        body = await until_disconnect(request, ctx.whole())
    finally:
        cleanup()
    return JSONResponse(body) if body is not None else Response(status_code=499)


class Context:
    """Builds one job's response from its generation's deltas."""

    def __init__(self, state: ServerState, job: Job, gen: Generation) -> None:
        self.state, self.job, self.gen = state, job, gen
        self.id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if job.chat else "text_completion"
        n = job.params.n
        self.choices = [Choice(i) for i in range(n * len(job.prompts))]
        # Every chunk starts the same: its JSON is made once, each chunk adds its choice (and usage null).
        head = json.dumps(self._head(True), ensure_ascii=False, separators=(",", ":"))
        self._chunk_open = "data: " + head[:-1] + ',"choices":['
        self._chunk_close = "]" + (',"usage":null' if job.include_usage else "") + "}\n\n"

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.job.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.state.config.model_name}

    def _usage(self) -> dict[str, int]:
        return usage(self.gen.num_prompt_tokens, self.gen.num_output_tokens)

    async def whole(self) -> dict[str, Any]:
        async for ready in self.gen.events():
            for prompt, deltas in ready:
                for d in deltas:
                    self.choices[prompt * self.job.params.n + d.index].add(d)
        return {**self._head(False), "choices": [self._choice(c) for c in self.choices], "usage": self._usage()}

    def _choice(self, c: Choice) -> dict[str, Any]:
        text_of = self.state.token_text
        if self.job.chat:
            lp = (chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs, text_of, self.job.top_logprobs)
                  if self.job.params.logprobs is not None else None)
            return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                    "finish_reason": c.finish_reason}
        prefix = self.job.echo[c.index // self.job.params.n] if self.job.echo else ""
        lp = (completion_logprobs(c.token_ids, c.logprobs, c.top_logprobs, text_of, 0)
              if self.job.params.logprobs is not None else None)
        return {"index": c.index, "text": prefix + c.text, "logprobs": lp, "finish_reason": c.finish_reason}

    async def stream(self) -> AsyncIterator[str]:
        try:
            for c in self.choices:  # the opening chunk: the chat role, or the echoed prompt
                if self.job.chat:
                    yield self._chunk(c.index, {"role": "assistant", "content": ""}, None, None)
                elif self.job.echo:
                    yield self._chunk(c.index, self.job.echo[c.index // self.job.params.n], None, None)
            async for ready in self.gen.events():
                chunks = []
                for prompt, deltas in ready:
                    for d in deltas:
                        c = self.choices[prompt * self.job.params.n + d.index]
                        offset = len(c.text)
                        c.add(d)
                        chunks.append(self._chunk(c.index, self._piece(d), self._delta_logprobs(d, offset),
                                                  d.finish_reason))
                yield "".join(chunks)  # one write for all that arrived since the last
            if self.job.include_usage:
                yield sse({**self._head(True), "choices": [], "usage": self._usage()})
        except APIError as err:  # the engine failed or the server is stopping: tell the client in the stream
            yield sse(err.body())
        yield SSE_DONE

    def _piece(self, d: Any) -> Any:
        return ({"content": d.text} if d.text or d.finish_reason is None else {}) if self.job.chat else d.text

    def _delta_logprobs(self, d: Any, offset: int) -> dict[str, Any] | None:
        if self.job.params.logprobs is None:
            return None
        if self.job.chat:
            return chat_logprobs(d.token_ids, d.logprobs, d.top_logprobs, self.state.token_text, self.job.top_logprobs)
        return completion_logprobs(d.token_ids, d.logprobs, d.top_logprobs, self.state.token_text, offset)

    def _chunk(self, index: int, piece: Any, logprobs: Any, reason: str | None) -> str:
        key = "delta" if self.job.chat else "text"
        if self.job.chat and isinstance(piece, str):
            piece = {"content": piece}
        choice = {"index": index, key: piece, "logprobs": logprobs, "finish_reason": reason}
        return self._chunk_open + json.dumps(choice, ensure_ascii=False, separators=(",", ":")) + self._chunk_close
