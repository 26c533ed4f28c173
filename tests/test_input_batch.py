"""Batch preparation: the vectorised `build_host_batch` (and the runner's `prepare` on the CPU) give exactly the
tensors of the per-token loop it replaced, over real scheduler steps that mix chunked prefills, decodes, arrivals
mid-generation, prefix-cache hits and preemption; the padded graph batch sizes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kiln.engine.block_manager import BlockManager
from kiln.engine.scheduler import Scheduler, SchedulerOutput
from kiln.engine.sequence import Sequence
from kiln.executor.cuda_graphs import graph_batch_sizes
from kiln.executor.input_batch import DeviceStaging, build_host_batch, pack_offsets


def loop_prepare(output: SchedulerOutput, block_size: int, all_logits: bool) -> dict[str, object]:
    """The per-token implementation ModelRunner.prepare had before (kept here as the definition to match)."""
    ids, positions, slots, starts, lens, sample_at = [], [], [], [0], [], []
    for item in output.scheduled:
        seq, begin = item.seq, item.seq.num_computed_tokens
        end = begin + item.num_new_tokens
        ids.extend(seq.token_ids[begin:end])
        positions.extend(range(begin, end))
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(begin, end))
        starts.append(len(ids))
        lens.append(end)
        if all_logits:
            sample_at.extend(range(starts[-2], len(ids)))
        elif item.needs_sample:
            sample_at.append(len(ids) - 1)
    width = max(len(item.seq.block_table) for item in output.scheduled)
    tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in output.scheduled]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.int64), "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "query_start_loc": torch.tensor(starts, dtype=torch.int32), "seq_lens": torch.tensor(lens, dtype=torch.int32),
        "block_tables": torch.tensor(tables, dtype=torch.int32),
        "logits_indices": torch.tensor(sample_at, dtype=torch.int64),
        "max_query_len": max(b - a for a, b in zip(starts, starts[1:])), "max_seq_len": max(lens),
    }


def assert_same(host, want: dict[str, object]) -> None:
    for name, expected in want.items():
        got = getattr(host, name)
        if isinstance(expected, torch.Tensor):
            got_t = torch.from_numpy(np.ascontiguousarray(got))
            assert got_t.dtype == expected.dtype, name
            assert got_t.shape == expected.shape and torch.equal(got_t, expected), name
        else:
            assert got == expected, name


def drive_and_compare(seed: int, block_size: int, budget: int, chunked: bool) -> int:
    """Run a random workload through the real scheduler; at every step compare both preparations (sampling and
    all-logits). Returns the number of steps that mixed prefill chunks with decodes."""
    rng = random.Random(seed)
    bm = BlockManager(48, block_size, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=budget, max_model_len=80,
                      enable_chunked_prefill=chunked)
    shared = [rng.randrange(100) for _ in range(2 * block_size)]  # a common prefix: prefix-cache hits
    pending = [Sequence(seq_id=i, prompt_token_ids=(shared if i % 2 else []) + [rng.randrange(100) for _ in
                                                                              range(rng.randrange(1, 40))],
                        max_tokens=rng.randrange(1, 12)) for i in range(14)]
    mixed = 0
    for _ in range(400):
        if pending and rng.random() < 0.4:  # requests join mid-generation
            sched.add(pending.pop(0))
        if not sched.has_unfinished():
            if not pending:
                return mixed
            continue
        out = sched.schedule()
        if out.is_empty:
            continue
        lens = [item.num_new_tokens for item in out.scheduled]
        mixed += int(max(lens) > 1 and min(lens) == 1)
        for all_logits in (False, True):
            assert_same(build_host_batch(out, block_size, all_logits), loop_prepare(out, block_size, all_logits))
        sched.postprocess(out, {item.seq.seq_id: rng.randrange(100) for item in out.scheduled if item.needs_sample})
    raise AssertionError("the workload did not finish")


@pytest.mark.parametrize("seed,block_size,budget,chunked", [(0, 4, 24, True), (1, 16, 40, True), (2, 8, 64, False)])
def test_host_batch_matches_the_per_token_loop(seed, block_size, budget, chunked):
    mixed = drive_and_compare(seed, block_size, budget, chunked)
    assert mixed > 0  # the workload did exercise chunked prefill next to decodes


def test_staging_on_cpu_returns_the_arrays_as_tensors():
    arrays = [np.arange(5, dtype=np.int64), np.array([[1, 2], [3, 4]], dtype=np.int32), np.zeros(0, dtype=np.int64)]
    out = DeviceStaging(torch.device("cpu")).upload(arrays)
    assert [t.dtype for t in out] == [torch.int64, torch.int32, torch.int64]
    assert all(torch.equal(t, torch.from_numpy(a)) for t, a in zip(out, arrays))


def test_pack_offsets_are_aligned_and_disjoint():
    arrays = [np.zeros(3, dtype=np.int32), np.zeros(5, dtype=np.int64), np.zeros((2, 3), dtype=np.int32)]
    offsets = pack_offsets(arrays)
    assert offsets[0] == 0 and all(o % 16 == 0 for o in offsets)
    assert all(offsets[i] + arrays[i].nbytes <= offsets[i + 1] for i in range(len(arrays)))


def test_build_host_batch_rejects_an_empty_step():
    with pytest.raises(ValueError, match="no sequence"):
        build_host_batch(SchedulerOutput(), 16)


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    with pytest.raises(ValueError, match="max_batch_size"):
        graph_batch_sizes(0)
