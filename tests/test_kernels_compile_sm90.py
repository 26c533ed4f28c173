"""kiln's newer Triton kernels compiled for an H100 (sm_90) on this CPU machine (kiln/kernels/compile_check.py):
the compiler checks what the interpreter-run kernel tests cannot (every branch's types, the inline PTX, fp8 dots).
It caught two faults in the W8A8 fused MoE before any GPU ran it. One subprocess without TRITON_INTERPRET compiles
every case; each test reads its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "kiln.kernels.compile_check"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ok(compiled: dict, prefix: str) -> list[str]:
    cases = [name for name in compiled if name.startswith(prefix)]
    assert cases, prefix
    failed = {name: compiled[name]["error"] for name in cases if not compiled[name]["ok"]}
    assert not failed, failed
    return cases


def test_weight_only_kernel_compiles_with_and_without_ptx(compiled):
    for name in _ok(compiled, "weight_only "):
        # The inline PTX is in the module exactly when asked for: its magic numbers (bf16 128.0 pairs for INT4, with
        # bit 3 set where the same lop3 flips signed nibbles; the byte selector into float32 2^23's mantissa for INT8).
        marker = "0x7440" if " int4 " not in name else "0x43084308" if " g0 " in name else "0x43004300"
        assert (marker in compiled[name]["ptx_markers"]) == name.endswith("asm=True"), name


def test_one_row_kernel_compiles(compiled):
    _ok(compiled, "one_row ")


def test_weight_only_and_group_wise_moe_kernels_compile_with_ptx(compiled):
    for name in _ok(compiled, "moe_wo_") + _ok(compiled, "moe_gw_"):
        assert compiled[name]["ptx_markers"], name


def test_w8a8_moe_kernels_compile(compiled):
    assert len(_ok(compiled, "moe_w8a8_")) == 8


def test_smoothquant_and_fp8_dense_kernels_compile(compiled):
    assert len(_ok(compiled, "sq ")) == 9 and len(_ok(compiled, "fp8 gemv")) == 2  # sq: 6 quantizers, 3 GEMM tiles
    assert len(_ok(compiled, "fp8 quantize rows")) == 3
    # FP8's quantizing norm (dynamic, static) and activation (gated dynamic, GELU static)
    assert len(_ok(compiled, "fp8 fused add_norm")) == 2 and len(_ok(compiled, "fp8 fused act")) == 2
