"""Batch preparation without a per-token Python loop: a scheduled step becomes numpy arrays on the host
(`build_host_batch`), then device tensors through one persistent pinned buffer and one copy (`DeviceStaging`).

The layout is the one reference.py documents: the new tokens of all scheduled sequences packed in batch order, each
with its position, its cache slot (`block_table[p // block_size] * block_size + p % block_size`), the sequences'
ranges (`query_start_loc`), their lengths after the step (`seq_lens`) and their block tables padded with block 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kiln.engine.scheduler import SchedulerOutput

_ALIGN = 16  # bytes: every field of the staging buffer starts at a multiple of this, so any dtype view is aligned


@dataclass
class HostBatch:
    """One step's batch as host arrays (the StepBatch fields before they reach the device)."""

    input_ids: np.ndarray  # [tokens] int64
    positions: np.ndarray  # [tokens] int64
    slot_mapping: np.ndarray  # [tokens] int64
    query_start_loc: np.ndarray  # [seqs + 1] int32
    seq_lens: np.ndarray  # [seqs] int32
    block_tables: np.ndarray  # [seqs, max_blocks] int32
    logits_indices: np.ndarray  # [rows] int64
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def arrays(self) -> list[np.ndarray]:
        """The array fields in StepBatch order (ids, positions, slots, starts, lens, tables, logits indices)."""
        return [self.input_ids, self.positions, self.slot_mapping, self.query_start_loc, self.seq_lens,
                self.block_tables, self.logits_indices]


@dataclass
class DeviceFeed:
    """Placeholder input tokens of a step and where their ids are on the device: ``input_ids[index[i]]`` takes
    ``source[rows[i]]`` (the previous step's sampled ids), with no host synchronization."""

    index: torch.Tensor  # [fed] int64: positions in the step's packed input_ids
    rows: torch.Tensor  # [fed] int64: rows of source
    source: torch.Tensor  # [previous rows] int64

    def apply(self, input_ids: torch.Tensor) -> None:
        """Write the fed ids into ``input_ids`` ``[tokens]`` in place (queued on the device after its upload)."""
        input_ids.index_copy_(0, self.index, self.source.index_select(0, self.rows).to(input_ids.dtype))


def _pad_block_tables(tables: list[list[int]]) -> np.ndarray:  # -> [seqs, width] int32, padded with block 0
    lengths = np.fromiter((len(t) for t in tables), dtype=np.int64, count=len(tables))
    width = int(lengths.max()) if len(tables) else 0
    out = np.zeros((len(tables), width), dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
    out[np.arange(width)[None, :] < lengths[:, None]] = flat  # row-major fill matches the chained order
    return out


def build_host_batch(output: SchedulerOutput, block_size: int, all_logits: bool = False) -> HostBatch:
    """Pack the scheduled sequences' new tokens with their positions, cache slots and block tables. Logits are taken
    at each sampling sequence's last token, or at every token with `all_logits`. Loops run over sequences, never
    over tokens: token-level fields are numpy expressions."""
    items = output.scheduled
    if not items:
        raise ValueError("the step schedules no sequence; there is nothing to prepare")
    n = len(items)
    begins = np.fromiter((it.seq.num_computed_tokens for it in items), dtype=np.int64, count=n)
    counts = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=n)
    ends = begins + counts
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    total = int(starts[-1])
    ids = np.fromiter(itertools.chain.from_iterable(it.seq.token_ids[b:e] for it, b, e in
                                                    zip(items, begins.tolist(), ends.tolist())),
                      dtype=np.int64, count=total)
    seq_of_token = np.repeat(np.arange(n), counts)  # [tokens]
    positions = np.arange(total, dtype=np.int64) + (begins - starts[:-1])[seq_of_token]
    tables = _pad_block_tables([it.seq.block_table for it in items])
    slots = tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    if all_logits:
        sample_at = np.arange(total, dtype=np.int64)
    else:
        needs = np.fromiter((it.needs_sample for it in items), dtype=bool, count=n)
        sample_at = starts[1:][needs] - 1
    return HostBatch(ids, positions, slots, starts.astype(np.int32), ends.astype(np.int32), tables,
                     sample_at.astype(np.int64), int(counts.max()), int(ends.max()))


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def pack_offsets(arrays: Sequence[np.ndarray]) -> list[int]:
    """Byte offsets of `arrays` packed one after another, each aligned, then the total size."""
    offsets, at = [], 0
    for arr in arrays:
        offsets.append(at)
        at += _aligned(arr.nbytes)
    return offsets + [at]


class DeviceStaging:
    """A persistent pinned host buffer mirrored by a device buffer: arrays are written into the host side and sent
    in one non_blocking copy per step; the returned tensors are views of the device side, valid until the next
    `upload`. On the CPU the arrays become tensors directly (no staging)."""

    def __init__(self, device: torch.device, capacity: int = 1 << 16, growable: bool = True) -> None:
        self.device, self.growable = device, growable
        self.host = torch.empty(0, dtype=torch.uint8)
        self.dev = torch.empty(0, dtype=torch.uint8, device=device)
        self._copied: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self.host = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        self.dev = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self._copied = None

    def write(self, arrays: Sequence[np.ndarray], offsets: Sequence[int]) -> None:
        """Copy `arrays` into the pinned host buffer at `offsets`, once the previous upload has left it."""
        if self._copied is not None:
            self._copied.synchronize()  # the last non_blocking copy may still be reading the host buffer
            self._copied = None
        host = self.host.numpy()
        for arr, off in zip(arrays, offsets):
            host[off : off + arr.nbytes] = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)

    def send(self, nbytes: int) -> None:
        """One host-to-device copy of the first `nbytes` bytes."""
        if nbytes:
            self.dev[:nbytes].copy_(self.host[:nbytes], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A typed view of the device buffer at a byte offset."""
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        return self.dev[offset : offset + nbytes].view(dtype).view(shape)

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The arrays as device tensors of the same dtypes and shapes."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        offsets = pack_offsets(arrays)
        if offsets[-1] > self.host.numel():
            if not self.growable:
                raise ValueError(f"the staging buffer holds {self.host.numel()} bytes; this step needs {offsets[-1]}")
            if self._copied is not None:
                self._copied.synchronize()
            self._allocate(max(offsets[-1], 2 * self.host.numel()))
        self.write(arrays, offsets)
        self.send(offsets[-2] + arrays[-1].nbytes if arrays else 0)
        return [self.view(off, torch_dtype(a.dtype), tuple(a.shape)) for a, off in zip(arrays, offsets)]


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype (int32, int64, bool, ...)."""
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
