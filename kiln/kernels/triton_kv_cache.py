"""Triton kernel that stores new keys and values into the paged KV cache (contract: reference.write_kv_cache)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_common import FLOAT_DTYPES, INDEX_DTYPES, check_device, check_shape, check_tensor
from kiln.kernels.triton_common import next_power_of_2

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
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr,
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
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _kv_write_config(width: int) -> tuple[int, int]:
    """(elements per program, num_warps) for a row of `width` elements."""
    for max_width, block, warps in _KV_WRITE_CONFIGS:
        if width <= max_width:
            return min(block, max(next_power_of_2(width), 16)), warps
    return _KV_WRITE_CONFIGS[-1][1], _KV_WRITE_CONFIGS[-1][2]


def _check_kv_inputs(key, value, k_cache, v_cache, slot_mapping) -> None:
    check_tensor("key", key, 3, FLOAT_DTYPES)
    device = key.device
    check_device(device)
    check_tensor("value", value, 3, FLOAT_DTYPES, device)
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES, device)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES, device)
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
) -> None:
    """Triton version of reference.write_kv_cache: one program per token (and block of its heads)."""
    _check_kv_inputs(key, value, k_cache, v_cache, slot_mapping)
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
        width, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], BLOCK=block, num_warps=warps,
    )
