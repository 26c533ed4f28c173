"""The kernels that prefill and mixed steps launch (attention, the fused MoEs of every expert format) compile once
per launch configuration, not once per class of step size: an H100 serve profile spent a third of a sweep
compiling variants of paged_attention_kernel as steps of new (sequences, tokens) classes arrived (docs/performance.md,
session 7). Triton's own binder, built for sm_90 in a subprocess without TRITON_INTERPRET, gives the
specialization key of each launch (kiln/kernels/specialization_check.py; with a kernel's do_not_specialize removed
it counts 9 variants)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_step_sizes_share_one_compiled_variant():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "kiln.kernels.specialization_check"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(variants) >= 11
    assert {kernel: count for kernel, count in variants.items() if count != 1} == {}
