"""kiln serve: the OpenAI-compatible HTTP server (docs/serving.md), in two processes.

The server process: app.py (routes, error bodies, lifespan) -> openai_routes.py (completions and chat) ->
generation.py (one request's deltas on the event loop) -> engine_client.py (the engine process's client: commands out,
deltas in, on the event loop). protocol.py validates request bodies, responses.py builds response bodies, state.py
holds the configuration, admission and prompt checks, served_model.py the model's config and tokenizer (no weights),
server.py runs uvicorn with a graceful SIGTERM.

The engine process: engine_process.py (loads kiln.LLM, drives the step loop over the pipes) -> step_loop.py (the
engine's step loop: requests, steps, detokenization and stop strings, with no transport).
"""
