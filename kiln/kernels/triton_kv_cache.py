"""Triton kernel that stores new keys and values into the paged KV cache (contract: reference.write_kv_cache), in
the engine dtype or quantized to INT8/FP8 with the layer's scales (kiln.quant.kv_cache's contract)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_common import FLOAT_DTYPES, INDEX_DTYPES, check_device, check_shape, check_tensor
from kiln.kernels.triton_common import next_power_of_2
from kiln.quant.kv_cache import QUANTIZED_KV_DTYPES, KVScales

# Adding then subtracting 1.5 * 2^23 rounds a float32 of magnitude < 2^22 to an integer, to nearest with ties to
# even (torch.round's rule), in any device's IEEE arithmetic; the operand is clamped first, so no multiply-add can be
# fused into it.
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)
# e4m3: 3 mantissa bits; normal numbers from 2^-6, subnormal steps of 2^-9 below.
E4M3_MIN_NORMAL: tl.constexpr = tl.constexpr(0.015625)
SUBNORMAL_MAGIC: tl.constexpr = tl.constexpr(12582912.0 * 2.0**-9)
# float32 bit masks, as int32 constants: sign, exponent and the top 3 mantissa bits; the sign bit alone.
KEEP_E4M3_BITS: tl.constexpr = tl.constexpr(-1048576)  # 0xFFF00000
SIGN_BIT: tl.constexpr = tl.constexpr(-2147483648)  # 0x80000000


@triton.jit
def _round_e4m3(v):
    """float32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), still float32, so that the cast to
    float8 that follows is exact. Done here rather than left to the cast: Triton 3.6's interpreter drops the carry
    when rounding a mantissa up into the next power of two (31.9 becomes 16), and on the GPU the result is the same."""
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # the last kept mantissa bit
    normal = ((bits + 0x7FFFF + lsb) & KEEP_E4M3_BITS).to(tl.float32, bitcast=True)  # keep sign, exponent, 3 bits
    magnitude = (tl.abs(v) + SUBNORMAL_MAGIC) - SUBNORMAL_MAGIC  # multiples of 2^-9, ties to even
    # The sign bit put back by hand: a tiny negative value rounds to -0, as the cast does.
    subnormal = (magnitude.to(tl.int32, bitcast=True) | (bits & SIGN_BIT)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < E4M3_MIN_NORMAL, subnormal, normal)


@triton.jit
def _quantize(x, inv, QMAX: tl.constexpr, IS_INT8: tl.constexpr):
    v = tl.minimum(tl.maximum(x.to(tl.float32) * inv, -QMAX), QMAX)
    if IS_INT8:
        v = (v + ROUND_MAGIC) - ROUND_MAGIC
    else:
        v = _round_e4m3(v)
    return v

# (largest kv_heads * head_dim) -> (elements per program, num_warps). One token's heads are usually a single tile
# (8 x 128 = 1024 elements for DBRX, 32 x 128 = 4096 for MPT-7B); wider rows are split over a second grid axis so
# a program keeps <= 32 elements per thread in flight.
_KV_WRITE_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (256, 256, 1),
    (1024, 1024, 4),
    (4096, 2048, 8),
)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    width,  # kv_heads * head_dim
    k_inv_ptr, v_inv_ptr,  # [kv_heads] float32 reciprocal scales (QUANT only)
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    QUANT: tl.constexpr, QMAX: tl.constexpr, IS_INT8: tl.constexpr,
):
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # A negative slot (padding, or a token whose KV is not kept) stores nothing: every lane is masked off.
    mask = (offs < width) & (slot >= 0)
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    block = slot // BLOCK_SIZE
    within = slot % BLOCK_SIZE
    tok = token.to(tl.int64)
    k = tl.load(key_ptr + tok * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + head * stride_vh + dim, mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + within * stride_kcs + head * stride_kch + dim
    v_dst = v_cache_ptr + block * stride_vcb + within * stride_vcs + head * stride_vch + dim
    if QUANT:
        k = _quantize(k, tl.load(k_inv_ptr + head, mask=mask, other=0.0), QMAX, IS_INT8)
        v = _quantize(v, tl.load(v_inv_ptr + head, mask=mask, other=0.0), QMAX, IS_INT8)
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _kv_write_config(width: int) -> tuple[int, int]:
    """(elements per program, num_warps) for a row of `width` elements."""
    for max_width, block, warps in _KV_WRITE_CONFIGS:
        if width <= max_width:
            return min(block, max(next_power_of_2(width), 16)), warps
    return _KV_WRITE_CONFIGS[-1][1], _KV_WRITE_CONFIGS[-1][2]


def check_kv_scales(k_cache: torch.Tensor, kv_scales: KVScales | None, device: torch.device) -> None:
    """A quantized cache needs its layer's scales ([kv_heads] float32 each), a float cache none."""
    quantized = k_cache.dtype in QUANTIZED_KV_DTYPES
    if quantized != (kv_scales is not None):
        raise ValueError(f"a {k_cache.dtype} KV cache " + ("needs its layer's KVScales" if quantized else
                         "takes no KV scales (they belong to an INT8/FP8 cache)"))
    if kv_scales is not None:
        for name in ("k_scale", "v_scale", "k_inv", "v_inv"):
            check_tensor(name, getattr(kv_scales, name), 1, (torch.float32,), device)
            check_shape(name, getattr(kv_scales, name), (k_cache.shape[2],))


def _check_kv_inputs(key, value, k_cache, v_cache, slot_mapping, kv_scales) -> None:
    check_tensor("key", key, 3, FLOAT_DTYPES)
    device = key.device
    check_device(device)
    check_tensor("value", value, 3, FLOAT_DTYPES, device)
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES + QUANTIZED_KV_DTYPES, device)
    check_tensor("v_cache", v_cache, 4, (k_cache.dtype,), device)
    check_kv_scales(k_cache, kv_scales, device)
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES, device)
    check_shape("value", value, tuple(key.shape))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    tokens, kv_heads, head_dim = key.shape
    if tuple(k_cache.shape[2:]) != (kv_heads, head_dim):
        raise ValueError(f"k_cache is [num_blocks, block_size, kv_heads, head_dim] = {tuple(k_cache.shape)} but "
                         f"key has {kv_heads} kv heads of dim {head_dim}; they must agree")
    check_shape("slot_mapping", slot_mapping, (tokens,))
    for name, t in (("key", key), ("value", value)):
        if kv_heads > 1 and head_dim > 1 and t.stride(1) < head_dim:
            raise ValueError(f"{name}'s heads overlap (stride {t.stride()}); pass a tensor with stride(1) >= head_dim")


def write_kv_cache(
    key: torch.Tensor,  # [tokens, kv_heads, head_dim]
    value: torch.Tensor,  # [tokens, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [tokens] int; negative = skip
    kv_scales: KVScales | None = None,  # an INT8/FP8 cache's scales
) -> None:
    """Triton version of reference.write_kv_cache: one program per token (and block of its heads)."""
    _check_kv_inputs(key, value, k_cache, v_cache, slot_mapping, kv_scales)
    tokens, kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    width = kv_heads * head_dim
    block, warps = _kv_write_config(width)
    grid = (tokens, triton.cdiv(width, block))
    _write_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        width, kv_scales.k_inv if kv_scales else key, kv_scales.v_inv if kv_scales else key,
        HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], BLOCK=block, QUANT=kv_scales is not None,
        QMAX=127.0 if k_cache.dtype == torch.int8 else 448.0, IS_INT8=k_cache.dtype == torch.int8, num_warps=warps,
    )
