"""Dequantization of packed integer weights to bf16 in PTX, two values per 32-bit instruction (NVIDIA GPUs only;
the weight-only kernels use it for bf16 activations on CUDA and the plain Triton arithmetic elsewhere: the
interpreter runs no inline assembly).

Why: at decode the weight-only matmul must turn 6e12 INT4 values a second into bf16 to keep up with an H100's
memory, and the plain path spends four to five 32-bit instructions on each (mask, shift, or, subtract, convert),
about what the SM can issue: the kernel was instruction-bound at 30-40% of its bandwidth floor. Here each 32-bit
register holds a pair of bf16 values and every instruction serves both (the magic-number trick of FasterTransformer
and Marlin: a nibble or-ed into the mantissa of bf16 128.0 is 128 + q exactly):

- INT4, two stored bytes (four values) in: one byte permute spreads them over the two halves of a register, one
  shift, two `lop3` (mask and or in one; for the signed per-channel format the same `lop3` also flips bit 3, which
  makes a two's complement nibble unsigned) make the four values 128 + q as bf16 pairs, two `fma.rn.bf16x2`
  subtract the per-row bias: 6 instructions for 4 values.
- INT8, two bytes in: bf16 cannot hold 128 + u for u up to 255 (8 significant bits), so each byte goes into the
  mantissa of float32 2^23 (one permute), a float32 subtract removes the bias, and one `cvt.rn.bf16x2.f32` packs
  the two (signed bytes are first made unsigned by flipping their top bits: one xor): 6 instructions for 2 values.

Two bytes at a time, not four: the tensor-core kernels hand these functions their weights in the dot operand's
register layout, where each thread holds pairs of adjacent bytes (16-bit shared-memory loads); packing four bytes
made the compiler split every pair into bytes and reassemble them (six byte permutes per 32-bit word: 144 of the
INT4 loop's 492 sm_90 instructions, 364 with pairs: `python benchmarks/sass_weight_only.py`).

The results equal the plain path's bit for bit: q - z is an integer of at most 8 significant bits for INT4 (exact
in bf16); for INT8 both paths round the float32 difference to bf16 once. tests/test_dequant_asm_emulated.py runs
these bodies through an emulator of their instructions on the CPU (every byte pair, every zero point); the GPU tests
compare the two paths in the kernels.

Register layout (inline_asm_elementwise with pack=2): two int8 elements arrive in one 16-bit register, element j in
byte j; a bf16 output of two elements is one 32-bit register, element 0 in the low half; a float32 input of two
elements is two registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

# INT4: outputs $0 (the low nibbles of bytes 0 and 1), $1 (their high nibbles); inputs $2 (the two bytes, 16 bits),
# $3 (the negated bias, a bf16 pair). prmt 0x4140 spreads the bytes to [b0, 0, b1, 0]: mask 0x000F000F then picks
# the low nibbles into the two halves, and after a shift by 4 the high ones. lop3 0xEA is (a & b) | c: or-ing bf16
# 128.0's bits 0x4300; for signed nibbles lop3 0x6A is b ? (a ^ c) : c with c = 0x43084308: the same or, and bit 3
# flipped (a two's complement nibble t becomes t + 8), in the one instruction.
_INT4_BODY = """
    .reg .b32 w, t, s, a0, a1, n0, one;
    mov.b32 n0, $3;
    mov.b32 one, 0x3F803F80;
    cvt.u32.u16 w, $2;
    prmt.b32 t, w, 0, 0x4140;
    shr.u32 s, t, 4;
    lop3.b32 a0, t, 0x000F000F, {magic}, {lut};
    lop3.b32 a1, s, 0x000F000F, {magic}, {lut};
    fma.rn.bf16x2 $0, a0, one, n0;
    fma.rn.bf16x2 $1, a1, one, n0;
"""
# (constexpr: compiled Triton reads no other kind of global)
_INT4_SIGNED = tl.constexpr("{" + _INT4_BODY.replace("{magic}", "0x43084308").replace("{lut}", "0x6A") + "}")
_INT4_UNSIGNED = tl.constexpr("{" + _INT4_BODY.replace("{magic}", "0x43004300").replace("{lut}", "0xEA") + "}")

# INT8: output $0 (a bf16 pair); inputs $1 (two bytes, 16 bits), $2, $3 (the negated bias + 2^23 of each element,
# float32). prmt 0x744j builds the float32 whose low byte is byte j and whose top byte is 0x4B: 2^23 + u.
_INT8_BODY = """
    .reg .b32 w, f0, f1, n0, n1, top;
    mov.b32 top, 0x4B000000;
    mov.b32 n0, $2;
    mov.b32 n1, $3;
    cvt.u32.u16 w, $1;
    {flip}
    prmt.b32 f0, w, top, 0x7440;
    prmt.b32 f1, w, top, 0x7441;
    add.f32 f0, f0, n0;
    add.f32 f1, f1, n1;
    cvt.rn.bf16x2.f32 $0, f1, f0;
"""
_INT8_SIGNED = tl.constexpr("{" + _INT8_BODY.replace("{flip}", "xor.b32 w, w, 0x8080;") + "}")
_INT8_UNSIGNED = tl.constexpr("{" + _INT8_BODY.replace("{flip}", "") + "}")


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
        low, high = tl.inline_asm_elementwise(_INT4_SIGNED, "=r,=r,h,r", [w, negated],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    else:
        low, high = tl.inline_asm_elementwise(_INT4_UNSIGNED, "=r,=r,h,r", [w, negated],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
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
        out = tl.inline_asm_elementwise(_INT8_SIGNED, "=r,h,r,r", [w, negated], dtype=tl.bfloat16,
                                        is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise(_INT8_UNSIGNED, "=r,h,r,r", [w, negated], dtype=tl.bfloat16,
                                        is_pure=True, pack=2)
    return out
