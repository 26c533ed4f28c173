"""The driver's control messages (kiln/distributed/control.py) between two gloo processes: messages that fit the
fixed broadcast and messages that need the second one arrive unchanged and in order, the fixed buffer reused."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.distributed.control import INLINE_BYTES, ControlChannel

MESSAGES = [
    ("step", {"seqs": [[1, 2, 3]], "released": []}),
    ("step", list(range(3 * INLINE_BYTES))),  # pickled, far over the fixed broadcast: sent in two
    ("step", "after a large one the small path still reads its own size"),
    ("stop", None),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        channel = ControlChannel(None)
        if rank == 0:
            for message in MESSAGES:
                channel.send(message)
        else:
            received = [channel.recv() for _ in MESSAGES]
            Path(out).write_text(json.dumps(received))
    finally:
        dist.destroy_process_group()


def test_messages_arrive_unchanged_and_in_order(tmp_path):
    out = tmp_path / "received.json"
    mp.spawn(_rank, args=(_free_port(), str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) == json.loads(json.dumps(MESSAGES))
