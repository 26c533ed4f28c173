"""The driver's messages to the other ranks (a step's plan, stop) over the gloo control group, one broadcast each.

torch's broadcast_object_list sends a message in two collectives (its size, then its bytes). Here every message
starts as one fixed-size broadcast that carries the size and, for a message that fits (a step plan of a few dozen
sequences), the bytes too; only a larger message needs a second broadcast. On a loaded 2-core machine a step plan
went from ~640 to ~360 us. The payload is pickled: these are kiln's own objects between kiln's own processes (no
checkpoint data is ever unpickled).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist

INLINE_BYTES = 4096  # the fixed broadcast: an 8-byte size, then up to INLINE_BYTES - 8 bytes of message
_HEADER = 8


class ControlChannel:
    """One rank's end of the control group: `send` on the source rank, `recv` on every other rank, in the same
    order on all of them (each call is a collective)."""

    def __init__(self, group: dist.ProcessGroup | None, src: int = 0) -> None:
        self.group, self.src = group, src
        self._buffer = torch.zeros(INLINE_BYTES, dtype=torch.uint8)  # reused: gloo broadcasts CPU tensors

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        size = len(data)
        self._buffer[:_HEADER] = torch.tensor([size], dtype=torch.int64).view(torch.uint8)
        inline = size <= INLINE_BYTES - _HEADER
        if inline:
            self._buffer[_HEADER:_HEADER + size] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.broadcast(self._buffer, src=self.src, group=self.group)
        if not inline:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=self.src, group=self.group)

    def recv(self) -> Any:
        dist.broadcast(self._buffer, src=self.src, group=self.group)
        size = int(self._buffer[:_HEADER].view(torch.int64)[0])
        if size <= INLINE_BYTES - _HEADER:
            data = self._buffer[_HEADER:_HEADER + size].numpy().tobytes()
        else:
            payload = torch.empty(size, dtype=torch.uint8)
            dist.broadcast(payload, src=self.src, group=self.group)
            data = payload.numpy().tobytes()
        return pickle.loads(data)  # noqa: S301 - kiln's own step plan from its own driver process
