"""kiln serve: the OpenAI-compatible HTTP server (docs/serving.md).

app.py (routes, error bodies, lifespan) -> openai_routes.py (completions and chat) -> generation.py (one request's
deltas on the event loop) -> engine_loop.py (the engine's step loop in its own thread). protocol.py validates request
bodies, responses.py builds response bodies, state.py holds the configuration, admission and prompt checks,
server.py runs uvicorn with a graceful SIGTERM.
"""
