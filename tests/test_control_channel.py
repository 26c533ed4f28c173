"""The driver's control messages (kiln/distributed/control.py) between two gloo processes: messages that fit the
fixed broadcast and messages that need the second one arrive unchanged and in order, the fixed buffer reused.
(Plain subprocesses, waited for: no helper process outlives the test, as tests/test_parallel_failures.py checks.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from kiln.distributed.control import INLINE_BYTES

MESSAGES = [
    ["step", {"seqs": [[1, 2, 3]], "released": []}],
    ["step", list(range(3 * INLINE_BYTES))],  # pickled, far over the fixed broadcast: sent in two
    ["step", "after a large one the small path still reads its own size"],
    ["stop", None],
]

RANK = """
import json, sys
import torch.distributed as dist
from kiln.distributed.control import ControlChannel
rank, port, messages, out = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
channel = ControlChannel(None)
if rank == 0:
    for message in messages:
        channel.send(message)
else:
    received = [channel.recv() for _ in messages]
    open(out, "w").write(json.dumps(received))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_messages_arrive_unchanged_and_in_order(tmp_path):
    out = tmp_path / "received.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    args = [str(_free_port()), json.dumps(MESSAGES), str(out)]
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), *args], env=env) for rank in (0, 1)]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    assert json.loads(Path(out).read_text()) == MESSAGES
