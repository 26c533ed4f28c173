"""A live `kiln serve` for tests: the shipped mpt-books model as a float32 engine, served by uvicorn in a thread on a
free loopback port (its engine in a process of its own, as always), and the official openai client pointed at it."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from kiln.cli.main import main as kiln_main
from kiln.serve.server import make_server
from kiln.serve.state import ServeConfig

REPO = Path(__file__).resolve().parents[1]
MPT_BOOKS = REPO / "models" / "mpt-books"
# A plain-text chat format (mpt-books' tokenizer has neither a chat_template nor ChatML tokens).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
MAX_INPUT_LEN, MAX_SEQ_LEN, MAX_BATCH = 256, 384, 16


def build_mpt_books_engine(root: Path) -> Path:
    """convert + build of models/mpt-books, float32, small limits (16 sequences, 256 prompt tokens)."""
    ckpt, engine = root / "ckpt", root / "engine"
    assert kiln_main(["convert", "--model_dir", str(MPT_BOOKS), "--output_dir", str(ckpt), "--dtype", "float32"]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), "--max_batch_size",
                      str(MAX_BATCH), "--max_input_len", str(MAX_INPUT_LEN), "--max_seq_len", str(MAX_SEQ_LEN)]) == 0
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    return engine


_SHARED: dict[str, Path] = {}


def shared_mpt_books_engine(tmp_path_factory) -> Path:
    """One engine of build_mpt_books_engine for every serve test module of the session (building takes seconds)."""
    if "engine" not in _SHARED:
        _SHARED["engine"] = build_mpt_books_engine(tmp_path_factory.mktemp("serve-engine"))
    return _SHARED["engine"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `config` in a thread; `url` is its base, `state` the server's ServerState."""

    def __init__(self, config: ServeConfig) -> None:
        self.server = make_server(config, log_level="warning")
        self.state = self.server.kiln_state
        self.url = f"http://127.0.0.1:{config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> "LiveServer":
        """Start serving (unless already started) and wait until the engine is ready."""
        if not self.thread.is_alive():
            self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.healthy:
                return self
            if self.state.status == "failed":
                raise RuntimeError(f"the server failed to load: {self.state.load_error}")
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def metric(self, name: str) -> float:
        """One unlabelled sample of GET /metrics."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert found, f"{name} not in /metrics"
        return float(found.group(1))

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until no request is in the engine and every KV block is free again (asserts it happens): the engine
        process has taken every command the server sent, and its stats after that say so."""
        deadline = time.monotonic() + timeout
        engine = self.state.engine
        while time.monotonic() < deadline:
            if (engine.idle and self.metric("kiln_kv_blocks_used") == 0
                    and self.metric("kiln_running_sequences") == 0):
                return
            time.sleep(0.05)
        raise AssertionError(f"not idle after {timeout}s: {engine.num_requests} requests, engine {engine.stats}, "
                             f"{self.metric('kiln_kv_blocks_used')} KV blocks used")


@contextlib.contextmanager
def live_server(engine: Path, **settings: object) -> Iterator[LiveServer]:
    server = LiveServer(ServeConfig(engine_dir=str(engine), port=free_port(), served_model_name="mpt-books",
                                    **settings)).start()
    try:
        yield server
    finally:
        server.stop()


def children(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc): the engine process of a kiln serve, its rank processes."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return "Z" not in (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    """Those of `pids` still alive after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


def start_kiln_serve(engine: Path, *flags: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`kiln serve` of `engine` as its own process on a free port (CPU, 1 thread); returns it and its URL once
    /health says 200. The caller ends it."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", "--engine_dir", str(engine), "--port", str(port),
                             "--device", "cpu", "--log_level", "warning", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"kiln serve did not become ready: {proc.communicate()[0].decode()[-2000:]}")
