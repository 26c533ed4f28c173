"""Timing kiln: one case (a batch of equal-length random prompts) through the engine loop, step by step."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kiln.config import ConfigError
from kiln.engine.sequence import Sequence
from kiln.sampling_params import SamplingParams


@dataclass(frozen=True)
class KilnTiming:
    """Prefill: from the start until every sequence has its first token (one step when the batch's prompts fit in
    max_num_tokens, else chunked). Decode: the mean of the later steps, each one token for every sequence."""

    prefill_ms: float
    prefill_steps: int
    decode_ms: float
    decode_steps: int


def random_prompts(batch: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly from 1..vocab-1 (never 0, often a pad id): no two prompts share a prefix."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, max(2, vocab_size), (batch, input_len), generator=gen).tolist()


def check_case_fits(llm, batch: int, input_len: int, output_len: int) -> None:
    """Refuse a case the engine cannot run at once without preempting (which would time recomputation)."""
    build = llm.build
    if batch > build.max_batch_size:
        raise ConfigError(f"batch {batch} exceeds the engine's max_batch_size {build.max_batch_size}; rebuild with a "
                          "larger --max_batch_size or bench smaller batches")
    if input_len > build.max_input_len or input_len + output_len > build.max_seq_len:
        raise ConfigError(f"--input_len {input_len} + --output_len {output_len} does not fit the engine's "
                          f"max_input_len {build.max_input_len} / max_seq_len {build.max_seq_len}; rebuild with "
                          "larger limits or shorten the case")
    per_seq = -(-(input_len + output_len) // build.kv_block_size)
    if batch * per_seq > llm.runner.num_blocks:
        raise ConfigError(f"batch {batch} of {input_len + output_len} tokens needs {batch * per_seq} KV blocks, the "
                          f"cache has {llm.runner.num_blocks}; raise --kv_cache_free_gpu_memory_fraction or bench "
                          "smaller batches")


def _add(llm, prompts: list[list[int]], output_len: int) -> None:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for ids in prompts:
        llm.engine.add(Sequence(seq_id=llm.engine.new_seq_id(), prompt_token_ids=ids, max_tokens=output_len,
                                ignore_eos=True, params=params))


def run_case(llm, prompts: list[list[int]], output_len: int, device: torch.device) -> KilnTiming:
    """Generate output_len tokens for every prompt through LLMEngine.step, synchronising the device after each
    step (the step's sampled tokens reach the host anyway); time the prefill and each decode step. With async
    scheduling the next step is in flight when step() returns: waiting for it would undo the overlap being
    measured, so the time between returns is the step time."""
    from kiln.bench.physics import synchronize

    _add(llm, prompts, output_len)
    preemptions = llm.engine.scheduler.num_preemptions
    first, prefill_steps, decode_times = 0, 0, []
    synchronize(device)
    start = last = time.perf_counter()
    prefill_end = None
    while llm.engine.has_unfinished():
        events = llm.engine.step()
        if not getattr(llm.engine, "async_scheduling", False):
            synchronize(device)
        now = time.perf_counter()
        if prefill_end is None:
            prefill_steps += 1
            first += len(events)
            if first >= len(prompts):
                prefill_end = now
        else:
            decode_times.append(now - last)
        last = now
    if llm.engine.scheduler.num_preemptions != preemptions:
        raise ConfigError("the KV cache ran out during the case and sequences were preempted; raise "
                          "--kv_cache_free_gpu_memory_fraction or bench smaller batches")
    if prefill_end is None or not decode_times:
        raise RuntimeError("the engine finished without decode steps; is output_len >= 2?")
    return KilnTiming((prefill_end - start) * 1e3, prefill_steps, sum(decode_times) / len(decode_times) * 1e3,
                      len(decode_times))


def time_kiln_case(llm, batch: int, input_len: int, output_len: int, warmup: int, device: torch.device,
                   seed: int) -> KilnTiming:
    """`warmup` untimed runs at the case's shapes (at most 8 output tokens), then the timed one, each with fresh
    random prompts."""
    check_case_fits(llm, batch, input_len, output_len)
    vocab = llm.info.model.vocab_size
    for i in range(warmup):
        run_case(llm, random_prompts(batch, input_len, vocab, seed + 1 + i), min(output_len, 8), device)
    return run_case(llm, random_prompts(batch, input_len, vocab, seed), output_len, device)
