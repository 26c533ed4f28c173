"""How many compiled variants a Triton kernel needs across the sizes a serving engine's steps take, counted on any
machine without a GPU: Triton's own argument binder, built for an H100 (sm_90), gives each launch's specialization
key (an integer argument is specialized as 1, a multiple of 16, or other unless the kernel says do_not_specialize),
and every distinct key is one more compile at run time. Run without TRITON_INTERPRET:

    python -m kiln.kernels.specialization_check      # prints {"paged_attention": variants, ...} as JSON
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch

STEP_SIZES = (1, 2, 16, 17, 32, 33, 100)  # sequence and token counts of successive steps: every class Triton tells apart


def _binder(kernel: Any) -> Callable[..., tuple]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))


def _attention_keys() -> set[str]:
    """paged_attention_kernel's keys over step sizes (prefill tiles, bf16 cache, MPT-7B's head): everything but the
    sequence and token counts fixed, as in one engine."""
    from kiln.kernels.triton_attention_kernels import paged_attention_kernel

    bind = _binder(paged_attention_kernel)
    act, index = torch.empty(64, dtype=torch.bfloat16), torch.empty(64, dtype=torch.int32)
    constexprs = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, GROUP=1, BLOCK_SIZE=16, BLOCK_M=128, BLOCK_Q=128, BLOCK_N=64,
                      NUM_SPLITS=1, KEYS_PER_SPLIT=256, FUSED_MERGE=True, ONE_TILE=False, USE_ALIBI=True,
                      DOT_F32=False, PRECISION="ieee", WHILE_LOOP=True, QUANT_KV=False)
    keys = set()
    for seqs in STEP_SIZES:
        for tokens in STEP_SIZES:
            pointers = [act, act, act, act, index, index, index, act, act, act, index, act, act]
            strides = [6144, 128, 4096, 128, 32768, 2048, 128, 32768, 2048, 128, 64]
            _, spec, _ = bind(*pointers, 0.125, seqs, max(tokens, seqs), 32, *strides, **constexprs)
            keys.add(repr(spec))
    return keys


def _reduce_keys() -> set[str]:
    from kiln.kernels.triton_attention_kernels import reduce_splits_kernel

    bind = _binder(reduce_splits_kernel)
    part = torch.empty(64, dtype=torch.float32)
    out = torch.empty(64, dtype=torch.bfloat16)
    return {repr(bind(part, part, out, tokens, 32, 4096, 128, HEAD_DIM=128, HEAD_DIM_PAD=128, NUM_SPLITS=4,
                      SPLITS_PAD=4)[1]) for tokens in STEP_SIZES}


def main() -> None:
    print(json.dumps({"paged_attention": len(_attention_keys()), "reduce_splits": len(_reduce_keys())}))


if __name__ == "__main__":
    main()
