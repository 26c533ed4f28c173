"""kiln serve: an OpenAI-compatible HTTP server over an engine (docs/serving.md)."""

from __future__ import annotations

import argparse
import importlib.util

from kiln.config import ConfigError

HELP = "serve an engine over an OpenAI-compatible HTTP API (completions, chat, streaming)"
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine_dir", required=True, help="the engine to serve (kiln build's output)")
    p.add_argument("--tokenizer_dir", help="tokenizer directory (default: the tokenizer the engine carries)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: env KILN_API_KEY, else no key)")
    p.add_argument("--served_model_name", default=None, help="the model's name in the API (default: the engine "
                                                              "directory's name)")
    p.add_argument("--max_queue", type=int, default=1024,
                   help="requests that may wait for a running slot; more are refused with 429")
    p.add_argument("--max_concurrent_requests", type=int, default=None,
                   help="requests handed to the engine at once (default: twice its max_batch_size; the engine "
                        "runs max_batch_size sequences and queues the rest)")
    p.add_argument("--max_request_bytes", type=int, default=4 * 2**20, help="largest request body (413 beyond)")
    p.add_argument("--chat_template", default=None, help="a Jinja chat template file to use instead of the "
                                                         "tokenizer's own")
    p.add_argument("--shutdown_timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run on after SIGTERM before they are aborted")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=0.9,
                   help="share of the GPU memory left after the weights that the KV cache takes")
    p.add_argument("--max_tokens_in_paged_kv_cache", type=int, default=None,
                   help="cap on the tokens the KV cache holds (default: as many as the memory fraction allows)")
    p.add_argument("--no_cuda_graphs", "--enforce_eager", dest="no_cuda_graphs", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--no_warmup", action="store_true", help="on a GPU, skip the prefill step per token bucket run "
                   "before the server is ready (it compiles every prefill kernel variant, or loads it from Triton's "
                   "cache, before the first request instead of while requests stream)")
    p.add_argument("--no_async_scheduling", action="store_true",
                   help="wait for each step's tokens before launching the next")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's and kiln's log level")


def missing_packages() -> list[str]:
    return [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]


def check_args(args: argparse.Namespace) -> None:
    missing = missing_packages()
    if missing:
        raise ConfigError(f"kiln serve needs {', '.join(missing)}: pip install 'kiln[serve]'")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port (1..65535)")
    for name in ("max_queue", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        raise ConfigError(f"--max_concurrent_requests must be >= 1, got {args.max_concurrent_requests}")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown_timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if args.chat_template is not None:
        import os
        if not os.path.isfile(args.chat_template):
            raise ConfigError(f"--chat_template {args.chat_template} is not a file")


def check_port_free(host: str, port: int) -> None:
    """A port already taken is one line now, not a uvicorn log after the engine has loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({err.strerror})") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port or stop what "
                              "uses it") from None


def main(args: argparse.Namespace) -> int:
    import os

    check_args(args)
    check_port_free(args.host, args.port)
    from kiln.runtime_checks import runtime_device
    from kiln.checkpoint.kiln_format import load_artifact
    from kiln.serve.server import serve
    from kiln.serve.state import ServeConfig

    runtime_device(args.device)
    load_artifact(args.engine_dir, "engine")  # a wrong directory is one line here, not a server that never readies
    config = ServeConfig(
        engine_dir=args.engine_dir, tokenizer_dir=args.tokenizer_dir, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("KILN_API_KEY") or None, served_model_name=args.served_model_name,
        max_queue=args.max_queue, max_concurrent_requests=args.max_concurrent_requests,
        max_request_bytes=args.max_request_bytes, chat_template=args.chat_template, device=args.device,
        kv_cache_free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction,
        kv_cache_max_tokens=args.max_tokens_in_paged_kv_cache, use_cuda_graphs=not args.no_cuda_graphs,
        async_scheduling=not args.no_async_scheduling, shutdown_timeout_s=args.shutdown_timeout,
        warm_up=not args.no_warmup)
    return serve(config, args.log_level)
