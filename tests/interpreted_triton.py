"""Bring Triton into interpreter mode for kernel tests on the CPU.

Triton reads TRITON_INTERPRET when @triton.jit decorates a function, and decorates its own library (tl.sum, tl.cdiv,
...) when triton is first imported; an interpreted kernel cannot call a compiled library function, so the mode is
one per process. If triton was imported earlier in this pytest process in compiled mode (torch._dynamo imports it
when transformers loads), `interpret_triton` re-runs triton's library module and drops the compiled copies of the
given kiln kernel modules, so that their next import decorates them interpreted. CPU only: compiled kernels cannot
run there anyway.
"""

from __future__ import annotations

import importlib
import sys

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def interpret_triton(kernel_modules: tuple[str, ...]) -> None:
    if not isinstance(tl.standard.sum, InterpretedFunction):
        old = dict(vars(tl.standard))
        importlib.reload(tl.standard)  # re-runs its @jit decorators (and tensor-method registrations) interpreted
        for name, value in old.items():
            if getattr(tl, name, None) is value:
                setattr(tl, name, getattr(tl.standard, name))
    for name in kernel_modules:
        module = sys.modules.get(name)
        if module is not None and not any(isinstance(v, InterpretedFunction) for v in vars(module).values()):
            sys.modules.pop(name)
            package, _, attr = name.rpartition(".")
            if getattr(sys.modules.get(package), attr, None) is module:
                delattr(sys.modules[package], attr)  # else `from kiln.kernels import x` would find the old copy
