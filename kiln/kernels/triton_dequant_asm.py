"""Dequantization of packed integer weights to bf16 in PTX, two values per 32-bit instruction (NVIDIA GPUs only;
the weight-only kernels use it for bf16 activations on CUDA and the plain Triton arithmetic elsewhere: the
interpreter runs no inline assembly).

Why: at decode the weight-only matmul must turn 6e12 INT4 values a second into bf16 to keep up with an H100's
memory, and the plain path spends four to five 32-bit instructions on each (mask, shift, or, subtract, convert),
about what the SM can issue: the kernel was instruction-bound at 30-40% of its bandwidth floor. Here each 32-bit
register holds a pair of bf16 values and every instruction serves both (the magic-number trick of FasterTransformer
and Marlin: a nibble or-ed into the mantissa of bf16 128.0 is 128 + q exactly):

- INT4, four stored bytes (eight values) in: one byte permute, three shifts and four `lop3` (mask and or in one)
  make the eight values 128 + q as bf16 pairs, four `fma.rn.bf16x2` subtract the per-row bias: 12 instructions for
  8 values. Signed nibbles (per-channel format) are first made unsigned by flipping bit 3 of each (one xor).
- INT8, four bytes in: bf16 cannot hold 128 + u for u up to 255 (8 significant bits), so each byte goes into the
  mantissa of float32 2^23 (one permute), a float32 subtract removes the bias, and one `cvt.rn.bf16x2.f32` packs
  two: 11 instructions for 4 values, against about 22 before.

The results equal the plain path's bit for bit: q - z is an integer of at most 8 significant bits for INT4 (exact
in bf16); for INT8 both paths round the float32 difference to bf16 once.

Register layout (inline_asm_elementwise with pack=4): four int8 elements arrive in one 32-bit register, element j
in byte j; a bf16 output of four elements is two registers, elements (0, 1) and (2, 3), element 0 in the low half.
"""

from __future__ import annotations

import triton
import triton.language as tl

# INT4: outputs $0, $1 (low nibbles of bytes 0-1, 2-3), $2, $3 (high nibbles); inputs $4 (the four bytes), $5, $6
# (the negated bias, bf16 pairs of elements 0-1 and 2-3). Every input is copied before the first output is written
# (an output may share a register with an input). prmt 0x3120 orders the bytes [b0, b2, b1, b3], so that mask
# 0x000F000F picks the nibbles of b0 and b1 into the two halves, and shifts by 8, 4 and 12 the others.
_INT4_BODY = """
    .reg .b32 w, t, s1, s2, s3, a0, a1, a2, a3, n0, n1, one;
    mov.b32 n0, $5;
    mov.b32 n1, $6;
    mov.b32 one, 0x3F803F80;
    {flip}
    prmt.b32 t, w, w, 0x3120;
    shr.u32 s1, t, 8;
    shr.u32 s2, t, 4;
    shr.u32 s3, t, 12;
    lop3.b32 a0, t, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 a1, s1, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 a2, s2, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 a3, s3, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 $0, a0, one, n0;
    fma.rn.bf16x2 $1, a1, one, n1;
    fma.rn.bf16x2 $2, a2, one, n0;
    fma.rn.bf16x2 $3, a3, one, n1;
"""
# (constexpr: compiled Triton reads no other kind of global)
_INT4_SIGNED = tl.constexpr("{" + _INT4_BODY.replace("{flip}", "xor.b32 w, $4, 0x88888888;") + "}")
_INT4_UNSIGNED = tl.constexpr("{" + _INT4_BODY.replace("{flip}", "mov.b32 w, $4;") + "}")

# INT8: outputs $0, $1 (bf16 pairs); inputs $2 (four bytes), $3-$6 (the negated bias + 2^23 of each element, fp32).
# prmt 0x744j builds the float32 whose low byte is byte j and whose top byte is 0x4B: 2^23 + u.
_INT8_BODY = """
    .reg .b32 w, f0, f1, f2, f3, n0, n1, n2, n3, top;
    mov.b32 top, 0x4B000000;
    mov.b32 n0, $3;
    mov.b32 n1, $4;
    mov.b32 n2, $5;
    mov.b32 n3, $6;
    {flip}
    prmt.b32 f0, w, top, 0x7440;
    prmt.b32 f1, w, top, 0x7441;
    prmt.b32 f2, w, top, 0x7442;
    prmt.b32 f3, w, top, 0x7443;
    add.f32 f0, f0, n0;
    add.f32 f1, f1, n1;
    add.f32 f2, f2, n2;
    add.f32 f3, f3, n3;
    cvt.rn.bf16x2.f32 $0, f1, f0;
    cvt.rn.bf16x2.f32 $1, f3, f2;
"""
_INT8_SIGNED = tl.constexpr("{" + _INT8_BODY.replace("{flip}", "xor.b32 w, $2, 0x80808080;") + "}")
_INT8_UNSIGNED = tl.constexpr("{" + _INT8_BODY.replace("{flip}", "mov.b32 w, $2;") + "}")


@triton.jit
def nibbles_bf16(w, bias, SIGNED: tl.constexpr):
    """Bytes w int8 -> (low, high) bf16 of w's shape: each nibble minus `bias` (float32, broadcastable to w: the
    zero point, 0 where there is none; ignored for SIGNED, whose nibbles are two's complement -8..7)."""
    if SIGNED:
        offset = tl.full(w.shape, -136.0, tl.float32)
    else:
        offset = tl.broadcast_to(-(bias + 128.0), w.shape)
    negated = offset.to(tl.bfloat16)  # -(128 + zero): exact in bf16 for zeros 0..15
    if SIGNED:
        low, high = tl.inline_asm_elementwise(_INT4_SIGNED, "=r,=r,=r,=r,r,r,r", [w, negated],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        low, high = tl.inline_asm_elementwise(_INT4_UNSIGNED, "=r,=r,=r,=r,r,r,r", [w, negated],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    return low, high


@triton.jit
def bytes_bf16(w, bias, SIGNED: tl.constexpr):
    """Bytes w int8 -> bf16 of w's shape: signed -128..127 (`bias` ignored), or the uint8 they hold minus `bias`
    (float32, broadcastable to w), rounded once to bf16 as the plain path does."""
    if SIGNED:
        negated = tl.full(w.shape, -(8388608.0 + 128.0), tl.float32)
    else:
        negated = tl.broadcast_to(-(bias + 8388608.0), w.shape)
    if SIGNED:
        out = tl.inline_asm_elementwise(_INT8_SIGNED, "=r,=r,r,r,r,r,r", [w, negated], dtype=tl.bfloat16,
                                        is_pure=True, pack=4)
    else:
        out = tl.inline_asm_elementwise(_INT8_UNSIGNED, "=r,=r,r,r,r,r,r", [w, negated], dtype=tl.bfloat16,
                                        is_pure=True, pack=4)
    return out
