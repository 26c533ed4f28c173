"""A safetensors file written one tensor at a time: the header is laid out first from the known names, dtypes and
shapes, then each tensor's bytes are appended as it is produced, so memory holds one tensor, not the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.float64: "F64",
              torch.float8_e4m3fn: "F8_E4M3"}


class StreamingSafetensorsWriter:
    """Write tensors in the order given at construction; `close` checks that every one was written."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.order = [name for name, _, _ in layout]
        self.expected = {name: (dtype, tuple(shape)) for name, dtype, shape in layout}
        header: dict[str, object] = {"__metadata__": metadata or {}}
        offset = 0
        for name, dtype, shape in layout:
            size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise RuntimeError(f"tensor {name!r} written out of order")
        dtype, shape = self.expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        try:
            self.file.write(memoryview(data.numpy()))
        except OSError as err:  # a full disk or a size limit: name the file (the bare error names none)
            raise OSError(err.errno, err.strerror, str(self.path)) from err
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.order):
            raise RuntimeError(f"{self.path}: only {self.next} of {len(self.order)} tensors were written")
