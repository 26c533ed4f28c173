"""How many compiled variants a Triton kernel needs across the sizes a serving engine's steps take, counted on any
machine without a GPU: Triton's own argument binder, built for an H100 (sm_90), gives each launch's specialization
key (an integer argument is specialized as 1, a multiple of 16, or other unless the kernel says do_not_specialize),
and every distinct key is one more compile at run time. An H100 serve profile spent a third of its sweep compiling
attention variants as steps of new sizes arrived (docs/performance.md, session 7). Run without TRITON_INTERPRET:

    python -m kiln.kernels.specialization_check      # prints {"kernel": variants, ...} as JSON
"""

from __future__ import annotations

import importlib
import itertools
import json
from typing import Any

STEP_SIZES = (1, 2, 16, 17, 32, 33, 100)  # counts of successive steps: every class Triton tells apart
FIXED = 64  # every other argument: a shape or stride of the engine, the same in every step

# kernel -> its arguments that change from step to step (sequences, tokens, expert assignments and the blocks they
# fill); the kernels that prefill and mixed steps launch outside the decode graphs.
STEP_VARYING: dict[str, tuple[str, ...]] = {
    "triton_attention_kernels.paged_attention_kernel": ("num_seqs", "num_tokens"),
    "triton_attention_kernels.reduce_splits_kernel": ("num_tokens",),
    "triton_moe_kernels.moe_align_kernel": ("num_assignments", "sorted_len", "num_blocks"),
    "triton_moe_kernels.moe_gate_up_kernel": ("num_assignments", "num_m_blocks"),
    "triton_moe_kernels.moe_down_kernel": ("num_assignments", "num_m_blocks"),
    "triton_moe_weight_only_kernels.moe_wo_gate_up_kernel": ("num_assignments", "num_m_blocks"),
    "triton_moe_weight_only_kernels.moe_wo_down_kernel": ("num_assignments", "num_m_blocks"),
    "triton_moe_group_wise_kernels.moe_gw_gate_up_kernel": ("num_assignments", "num_m_blocks"),
    "triton_moe_group_wise_kernels.moe_gw_down_kernel": ("num_assignments", "num_m_blocks"),
    "triton_moe_w8a8_kernels.moe_w8a8_gate_up_kernel": ("num_assignments", "num_m_blocks"),
    "triton_moe_w8a8_kernels.moe_w8a8_down_kernel": ("num_assignments", "num_m_blocks"),
}


def _kernel(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"kiln.kernels.{module}"), name)


def variants(kernel: Any, varying: tuple[str, ...]) -> int:
    """Distinct specialization keys of `kernel` when the `varying` arguments take every combination of STEP_SIZES
    and all others stay fixed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    bind = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    names = [p.name for p in kernel.params]
    missing = [v for v in varying if v not in names]
    if missing:
        raise ValueError(f"{kernel.__name__} has no argument {missing}")
    keys = set()
    for sizes in itertools.product(STEP_SIZES, repeat=len(varying)):
        args = {p.name: (1 if p.is_constexpr else FIXED) for p in kernel.params} | dict(zip(varying, sizes))
        keys.add(repr(bind(**args)[1]))
    return len(keys)


def main() -> None:
    print(json.dumps({path: variants(_kernel(path), varying) for path, varying in STEP_VARYING.items()}))


if __name__ == "__main__":
    main()
