"""Compiling before serving: one prefill step per token bucket, so that the first requests do not wait for Triton.

A Triton kernel compiles the first time a launch configuration is met (~0.5 s each on an H100; later processes
load it from Triton's disk cache, still a few ms each). Decode steps compile when their CUDA graphs are captured
at load, but prefill and mixed steps choose their tiles by step size: the fused MoE by token bucket (1, 2, 4, ...),
the attention kernel by whether a sequence's queries fit one tile. On an H100 a server met those one by one while
streaming (docs/performance.md, session 7). Running one prefill step of each bucket up to the engine's
max_num_tokens, short and long prompts both, meets them all before the server says it is ready.
"""

from __future__ import annotations

from typing import Any

from kiln.engine.sequence import Sequence
from kiln.kernels.triton_moe_configs import token_buckets
from kiln.sampling_params import SamplingParams


def warm_up_prompts(num_tokens: int, max_input_len: int, max_batch_size: int, vocab_size: int,
                    first_id: int) -> list[list[int]]:
    """`num_tokens` prompt tokens cut into prompts of at most max_input_len (at most max_batch_size of them), each
    of distinct token ids from `first_id` on, so that no prompt finds another's blocks in the prefix cache."""
    lengths = []
    left = num_tokens
    while left > 0 and len(lengths) < max_batch_size:
        lengths.append(min(left, max_input_len))
        left -= lengths[-1]
    prompts, at = [], first_id
    for length in lengths:
        prompts.append([(at + i) % vocab_size for i in range(length)])
        at += length
    return prompts


def warm_up(llm: Any) -> list[int]:
    """Run one prefill step of every token bucket up to the engine's max_num_tokens (one token each to sample), then
    forget the warm-up in the prefix cache and its counters. Returns the step sizes run (tokens per step)."""
    build, engine = llm.build, llm.engine
    blocks = engine.scheduler.block_manager
    vocab = llm.info.model.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    # A KV cache smaller than one full step (a small --max_tokens_in_paged_kv_cache) caps the steps too: each prompt
    # takes whole blocks, plus one for its sampled token.
    room = (blocks.num_blocks - build.max_batch_size) * blocks.block_size
    sizes: list[int] = []
    first_id = 0
    for bucket in token_buckets(build.max_num_tokens):
        tokens = min(bucket, build.max_num_tokens, build.max_input_len * build.max_batch_size, room)
        if tokens < 1:
            break
        if tokens in sizes:  # the engine's limits cap the buckets: the same step again compiles nothing new
            continue
        prompts = warm_up_prompts(tokens, build.max_input_len, build.max_batch_size, vocab, first_id)
        first_id += tokens
        for ids in prompts:
            engine.add(Sequence(engine.new_seq_id(), ids, 1, ignore_eos=True, params=params))
        while engine.has_unfinished():
            engine.step()
        sizes.append(tokens)
    blocks.reset_prefix_cache()
    blocks.num_prefix_hit_tokens = blocks.num_prefix_query_tokens = 0
    return sizes
