"""The FastAPI application: routes, error bodies, request counting, and the engine's life cycle (lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import kiln
from kiln.serve import openai_routes
from kiln.serve.errors import APIError, bad_request
from kiln.serve.http_io import check_api_key, read_json
from kiln.serve.state import ServeConfig, ServerState

logger = logging.getLogger(__name__)


def create_app(config: ServeConfig) -> FastAPI:
    """The server for `config`; the engine loads when the app starts (GET /health is 503 until it is ready)."""
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load())
        try:
            yield
        finally:
            state.status = "stopping"
            loading.cancel()  # a stop while the engine loads ends the load (close() then kills the engine process)
            await asyncio.gather(loading, return_exceptions=True)
            await state.close()

    app = FastAPI(title="kiln", version=kiln.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.kiln = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(CountRequests, metrics=state.metrics)
    app.add_api_route("/v1/completions", openai_routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", openai_routes.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/version", version, methods=["GET"])
    return app


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own (unknown path 404, wrong method 405) in OpenAI's error shape."""
    return JSONResponse(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body(),
                        status_code=err.status_code)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    """A bug: the traceback goes to the log, the client gets one line without it."""
    logger.exception("internal error serving %s %s", request.method, request.url.path)
    return JSONResponse(APIError(500, f"internal error ({type(err).__name__}); see the server log").body(),
                        status_code=500)


class CountRequests:
    """Counts every response by path and status (pure ASGI, so that streaming and disconnects pass untouched)."""

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
            self.metrics.requests.labels(path, str(status["code"])).inc()


_KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                "/detokenize", "/version"}


def _state(request: Request) -> ServerState:
    return request.app.state.kiln


async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    check_api_key(request, state.config.api_key)
    card = {"id": state.config.model_name, "object": "model", "created": int(time.time()), "owned_by": "kiln"}
    if state.model is not None:
        card["max_model_len"] = state.model.build.max_seq_len
    return {"object": "list", "data": [card]}


async def health(request: Request) -> Response:
    state = _state(request)
    if state.healthy:
        return Response(status_code=200)
    return JSONResponse({"status": state.status}, status_code=503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def version(request: Request) -> dict[str, str]:
    return {"version": kiln.__version__}


async def tokenize(request: Request) -> dict[str, Any]:
    """{"prompt": text} or {"messages": [...]} -> {"tokens": ids, "count": n, "max_model_len": limit}."""
    state = _state(request)
    state.require_ready()
    body = await read_json(request, state.config.max_request_bytes)
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    tokenizer = state.need_tokenizer("tokenize")
    if isinstance(body.get("prompt"), str):
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise bad_request("add_special_tokens must be true or false", "add_special_tokens")
        ids = await state.off_loop(tokenizer.encode, body["prompt"], add)
    elif isinstance(body.get("messages"), list):
        ids = await state.off_loop(tokenizer.apply_chat_template, body["messages"], True)
    else:
        raise bad_request("give a string 'prompt' or a list of chat 'messages'", "prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": state.model.build.max_seq_len}


async def detokenize(request: Request) -> dict[str, str]:
    """{"tokens": ids} -> {"prompt": text}."""
    state = _state(request)
    state.require_ready()
    body = await read_json(request, state.config.max_request_bytes)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list):
        raise bad_request("give 'tokens', a list of token ids", "tokens")
    vocab = state.model.vocab_size
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise bad_request(f"tokens holds {t!r}; token ids are integers in 0..{vocab - 1}", "tokens")
    tokenizer = state.need_tokenizer("detokenize")
    return {"prompt": await state.off_loop(tokenizer.decode, tokens)}
