"""CUDA graphs for decode-only steps: the model forward, final norm and LM head captured once per padded batch size
and replayed, so a decode step costs one host-to-device copy and one graph launch instead of hundreds of kernel
launches from Python.

Every captured kernel reads its inputs from static device buffers (one staging buffer, filled by one copy per step)
and has a grid fixed by the padded batch size and the engine's limits: attention takes its split count from
`max_seq_len` and the block table's full width, the MoE its grids from the padded token count. Rows past the real
batch are padding: token 0 at position 0 with slot -1 (the KV write skips it), a one-token context in block 0 (read,
never written) and its own query range, so it neither writes the cache nor touches the real rows' results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kiln.executor.input_batch import DeviceFeed, DeviceStaging, HostBatch, pack_offsets, torch_dtype
from kiln.kernels import KernelSet
from kiln.layers.context import AttentionMetadata, ForwardContext

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, 8, then every multiple of 8 up to max_batch_size (and it)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = {s for s in (1, 2, 4, 8) if s <= max_batch_size}
    sizes.update(range(16, max_batch_size + 1, 8))
    sizes.add(max_batch_size)
    return sorted(sizes)


@dataclass(frozen=True)
class GraphLimits:
    """The shapes the graphs are captured for."""

    max_batch_size: int  # largest decode batch run by a graph; larger ones run eagerly
    max_blocks_per_seq: int  # block table width of every graph (cdiv(max_seq_len, block_size))
    max_seq_len: int  # steers the attention split count, the same for every step
    vocab_size: int


class DecodeGraphs:
    """Captured decode steps of one model at the padded sizes of `graph_batch_sizes`. `capture()` once after the KV
    cache is bound; then `can_run(batch)` and `run(batch)` per step. Logits come back as a fresh [seqs, vocab]
    float32 tensor, one row per sequence of the batch."""

    def __init__(self, model: torch.nn.Module, kernels: KernelSet, limits: GraphLimits, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.kernels, self.limits, self.device = model, kernels, limits, device
        self.sizes = graph_batch_sizes(limits.max_batch_size)
        bs, width = limits.max_batch_size, limits.max_blocks_per_seq
        shapes = [((bs,), np.int64), ((bs,), np.int64), ((bs,), np.int64), ((bs,), np.int32), ((bs + 1,), np.int32),
                  ((bs, width), np.int32)]  # ids, positions, slots, seq_lens, query_start_loc, block_tables (last)
        self._templates = [np.zeros(shape, dtype=dtype) for shape, dtype in shapes]
        self._offsets = pack_offsets(self._templates)
        self.staging = DeviceStaging(device, capacity=self._offsets[-1], growable=False)
        views = [self.staging.view(off, torch_dtype(t.dtype), t.shape) for t, off in zip(self._templates, self._offsets)]
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.query_start_loc, self.block_tables = views
        self.logits = torch.empty(bs, limits.vocab_size, dtype=torch.float32, device=device)  # [max_bs, vocab]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0  # device memory the captured graphs hold (measured at capture)

    def padded_size(self, seqs: int) -> int | None:
        """The smallest captured size >= seqs, or None when the batch is too large for any graph."""
        for size in self.sizes:
            if size >= seqs:
                return size
        return None

    def can_run(self, batch: HostBatch) -> bool:
        """Decode-only (one new token per sequence), within the captured batch size and block-table width."""
        return (batch.max_query_len == 1 and batch.num_tokens == batch.num_seqs
                and batch.num_seqs <= self.limits.max_batch_size
                and batch.block_tables.shape[1] <= self.limits.max_blocks_per_seq)

    def _stage(self, batch: HostBatch | None, size: int) -> None:
        """Write the padded batch into the static buffers: one host-to-device copy."""
        n = 0 if batch is None else batch.num_seqs
        ids, pos, slots, lens, starts, tables = (t[: size + 1] if i == 4 else t[:size]
                                                 for i, t in enumerate(self._templates))
        ids[:], pos[:], slots[:], lens[:], tables[:] = 0, 0, -1, 1, 0
        starts[:] = np.arange(size + 1, dtype=np.int32)  # padding rows: one query token each
        if batch is not None:
            ids[:n], pos[:n], slots[:n] = batch.input_ids, batch.positions, batch.slot_mapping
            lens[:n] = batch.seq_lens
            tables[:n, : batch.block_tables.shape[1]] = batch.block_tables
        arrays = [ids, pos, slots, lens, starts, tables]
        self.staging.write(arrays, self._offsets[:-1])
        self.staging.send(self._offsets[5] + tables.nbytes)

    def _forward(self, size: int) -> None:
        meta = AttentionMetadata(self.slot_mapping[:size], self.query_start_loc[: size + 1], self.seq_lens[:size],
                                 self.block_tables[:size], max_query_len=1, max_seq_len=self.limits.max_seq_len)
        hidden = self.model(self.input_ids[:size], self.positions[:size], ForwardContext(self.kernels, meta))
        self.logits[:size].copy_(self.model.compute_logits(hidden))  # [size, vocab]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one memory pool (the graphs never run at the same time). Each
        size runs once eagerly first so that every Triton kernel is compiled outside the capture."""
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._stage(None, size)
            self._forward(size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        log.info("captured %d decode graphs (batch %s) in %.1f MiB", len(self.sizes), self.sizes,
                 self.memory_bytes / 2**20)

    def release(self) -> None:
        """Free the captured graphs now, whoever still holds this object. Multi-rank engines call it before they
        leave their process groups: a graph that captured NCCL collectives and outlives its communicator's teardown
        (kept alive by a reference or a reference cycle) makes that teardown hang."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def run(self, batch: HostBatch, feed: DeviceFeed | None = None) -> torch.Tensor:  # -> [seqs, vocab] float32
        """Replay the smallest graph that holds the batch; the caller checked `can_run`. `feed` writes the previous
        step's sampled ids into placeholder input tokens on the device, after the upload, before the replay."""
        size = self.padded_size(batch.num_seqs)
        if size is None or not self.graphs:
            raise RuntimeError("no captured graph holds this batch; check can_run() and call capture() first")
        self._stage(batch, size)
        if feed is not None:
            feed.apply(self.input_ids[:size])
        self.graphs[size].replay()
        return self.logits[: batch.num_seqs].clone()  # the static buffer is overwritten by the next replay
