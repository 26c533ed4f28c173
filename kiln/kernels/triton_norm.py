"""Triton kernel for the pre-norm block's residual add and LayerNorm/RMSNorm in one pass (contract:
reference.add_norm).

At decode batch sizes a row is a few thousand elements: torch's layer_norm puts one row on one block and takes ~8 us
on an H200, and the residual add before it is another launch. Here one program loads a row (and its residual)
once, writes the sum, and normalises it from registers: one launch of ~2-3 us for both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_common import FLOAT_DTYPES, check_device, check_shape, check_tensor, row_block

_MAX_DIM = 32768  # one row lives in registers; wider rows are not a hidden size kiln runs


@triton.jit
def add_norm_row(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, row, cols, mask, dim, stride_x, stride_r, stride_s, eps,
                 HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr):
    """One row's residual add (the sum stored) and norm: returns the normed row in float32, before rounding to the
    model dtype (also the body of the quantizing norms, through add_norm_row_rounded)."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the model dtype before the statistics, as torch's separate add would leave it.
        s = (x + r).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
        normed = (x * rstd).to(w.dtype)  # Baichuan: the normalised value in the weight's dtype, then the multiply
        y = normed.to(tl.float32) * w.to(tl.float32)
    else:
        mean = tl.sum(x, axis=0) / dim
        centred = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / dim + eps)
        y = centred * rstd * w.to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def add_norm_row_rounded(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, row, cols, mask, dim, stride_x, stride_r, stride_s,
                         eps, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr):
    """add_norm_row's output as the unfused kernel stores it (rounded to the model dtype), back in float32, masked
    lanes 0: what a quantizing norm (SmoothQuant's, FP8's) quantizes, so that it matches add_norm then quantize."""
    y = add_norm_row(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, row, cols, mask, dim, stride_x, stride_r, stride_s, eps,
                     HAS_RESIDUAL, HAS_BIAS, RMS)
    return tl.where(mask, y.to(sum_ptr.dtype.element_ty).to(tl.float32), 0.0)


@triton.jit
def _add_norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, sum_ptr,
    dim, stride_x, stride_r, stride_o, stride_s, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    y = add_norm_row(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, row, cols, mask, dim, stride_x, stride_r, stride_s, eps,
                     HAS_RESIDUAL, HAS_BIAS, RMS)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_inputs(x, residual, weight, bias, eps, rms) -> None:
    check_tensor("x", x, 2, FLOAT_DTYPES)
    device = x.device
    check_device(device)
    dim = x.shape[1]
    if not 0 < dim <= _MAX_DIM:
        raise ValueError(f"add_norm takes rows of 1..{_MAX_DIM} elements, got x of shape {tuple(x.shape)}")
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t, 2 if name == "residual" else 1, FLOAT_DTYPES, device)
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; the kernel takes one dtype for all")
    if residual is not None:
        check_shape("residual", residual, tuple(x.shape))
    check_shape("weight", weight, (dim,))
    if bias is not None:
        if rms:
            raise ValueError("RMSNorm has no bias; pass bias=None with rms=True")
        check_shape("bias", bias, (dim,))
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def add_norm(
    x: torch.Tensor,  # [tokens, dim]
    residual: torch.Tensor | None,  # [tokens, dim] or None
    weight: torch.Tensor,  # [dim]
    bias: torch.Tensor | None,  # [dim]
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # normed [tokens, dim], summed [tokens, dim]
    """Triton version of reference.add_norm: one program per row."""
    _check_inputs(x, residual, weight, bias, eps, rms)
    tokens, dim = x.shape
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    if tokens == 0:
        return out, summed
    block, warps = row_block(dim)
    res = residual if residual is not None else x
    _add_norm_kernel[(tokens,)](
        x, res, weight, bias if bias is not None else weight, out, summed,
        dim, x.stride(0), res.stride(0), out.stride(0), summed.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK=block, num_warps=warps,
    )
    return out, summed
