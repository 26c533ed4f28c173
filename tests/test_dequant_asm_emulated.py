"""The inline PTX of kiln/kernels/triton_dequant_asm.py run on the CPU by a small emulator of the instructions it uses
(mov, cvt, prmt, shr, xor, lop3, fma.rn.bf16x2, add.f32, cvt.rn.bf16x2.f32), over every 16-bit input pair and
every zero point, against the plain formula: q - bias for each nibble or byte. The interpreter cannot run inline
PTX and only a GPU test compared it before; this checks the byte permutes, the lop3 truth tables (the signed flip
folded into the mask) and the register order of the outputs wherever CI runs. The emulator follows the PTX ISA's
definitions (prmt's byte selectors, lop3's truth-table index a*4 + b*2 + c, bf16x2 halves with element 0 low)."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch

from kiln.kernels import triton_dequant_asm as asm


def _bf16_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _bf16_value(bits: int) -> float:
    return float(torch.tensor([bits - 0x10000 if bits & 0x8000 else bits], dtype=torch.int16).view(torch.bfloat16))


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _f32_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _prmt(a: int, b: int, selector: int) -> int:
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (selector >> (4 * i)) & 0xF
        byte = pool[sel & 7]
        if sel & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = ((a >> bit) & 1) * 4 + ((b >> bit) & 1) * 2 + ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    out = 0
    for half in (0, 16):
        x, y, z = (_bf16_value((r >> half) & 0xFFFF) for r in (a, b, c))
        out |= _bf16_bits(x * y + z) << half  # exact here: small integers times 1.0 plus an integer
    return out


def run_ptx(body: str, operands: dict[str, int]) -> dict[str, int]:
    """Registers after `body` ({...} of .reg declarations and instructions) with $n bound to `operands`."""
    regs = dict(operands)

    def val(token: str) -> int:
        token = token.strip()
        return int(token, 16) if token.startswith("0x") else int(token) if token.isdigit() else regs[token]

    for line in body.strip().strip("{}").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [t.strip() for t in rest.split(",")]
        v = [val(t) for t in args]
        if op in ("mov.b32",):
            regs[dst] = v[0]
        elif op == "cvt.u32.u16":
            regs[dst] = v[0] & 0xFFFF
        elif op == "prmt.b32":
            regs[dst] = _prmt(v[0], v[1], v[2])
        elif op == "shr.u32":
            regs[dst] = (v[0] & 0xFFFFFFFF) >> v[1]
        elif op == "xor.b32":
            regs[dst] = v[0] ^ v[1]
        elif op == "lop3.b32":
            regs[dst] = _lop3(v[0], v[1], v[2], v[3])
        elif op == "fma.rn.bf16x2":
            regs[dst] = _fma_bf16x2(v[0], v[1], v[2])
        elif op == "add.f32":
            regs[dst] = _f32_bits(float(np.float32(_f32_value(v[0])) + np.float32(_f32_value(v[1]))))
        elif op == "cvt.rn.bf16x2.f32":  # d = {hi: a, lo: b}
            regs[dst] = (_bf16_bits(_f32_value(v[0])) << 16) | _bf16_bits(_f32_value(v[1]))
        else:
            raise AssertionError(f"the emulator does not know {op!r}: extend it with the PTX ISA's definition")
    return regs


def _pair(bits: int) -> tuple[float, float]:
    return _bf16_value(bits & 0xFFFF), _bf16_value(bits >> 16)


@pytest.mark.parametrize("signed", [True, False])
def test_int4_ptx_gives_each_nibble_minus_its_bias(signed):
    body = (asm._INT4_SIGNED if signed else asm._INT4_UNSIGNED).value
    assert re.search(r"\$3", body) and "pack" not in body
    for zero in ([8] if signed else range(16)):  # signed: the flip's +8, removed by the bias -136
        negated = _bf16_bits(-(128.0 + zero))
        for pair in range(0, 0x10000, 7 if signed else 97):  # every pair for signed; a stride for the 16 zeros
            regs = run_ptx(body, {"$2": pair, "$3": negated | (negated << 16)})
            b0, b1 = pair & 0xFF, pair >> 8

            def value(nibble: int) -> int:
                return (nibble - 16 if nibble >= 8 else nibble) if signed else nibble - zero

            assert _pair(regs["$0"]) == (value(b0 & 0xF), value(b1 & 0xF)), (pair, zero)
            assert _pair(regs["$1"]) == (value(b0 >> 4), value(b1 >> 4)), (pair, zero)


@pytest.mark.parametrize("signed", [True, False])
def test_int8_ptx_gives_each_byte_minus_its_bias(signed):
    body = (asm._INT8_SIGNED if signed else asm._INT8_UNSIGNED).value
    for zero in ([128.0] if signed else [0.0, 3.0, 127.0, 255.0]):  # zero points are integers
        negated = _f32_bits(-(8388608.0 + zero))
        for pair in range(0, 0x10000, 5):
            regs = run_ptx(body, {"$1": pair, "$2": negated, "$3": negated})
            b0, b1 = pair & 0xFF, pair >> 8

            def value(byte: int) -> float:
                q = (byte - 256 if byte >= 128 else byte) if signed else byte - zero
                return float(torch.tensor([q], dtype=torch.float32).to(torch.bfloat16))

            assert _pair(regs["$0"]) == (value(b0), value(b1)), (pair, zero)
