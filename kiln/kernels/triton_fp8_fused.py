"""FP8 W8A8's activation quantization fused into the kernel before each linear layer that can take it (contract: the
unfused CUDA path, the norm or activation in the model dtype, then kiln.quant.fp8's `activation_scale` and
`cast_fp8`, bit for bit).

- `add_norm_fp8`: the pre-norm block's residual add and LayerNorm/RMSNorm (triton_norm's `add_norm_row`, rounded to
  the model dtype as the unfused norm stores it) with the normed row quantized to e4m3 in the same pass: QKV and a
  dense MLP's first projection read fp8.
- `act_fp8`: a dense MLP's activation (silu(gate) * up, or exact GELU; triton_jit_common's `mlp_activation_row`,
  SmoothQuant's math) quantized in the same pass: down_proj reads fp8.

Why: every FP8 layer otherwise pays its own quantization launch (triton_fp8_quant), four per block, each a pass over
an activation that the kernel before it just wrote; at batch-1 decode those launches are a visible part of a step.
The quantization is triton_fp8_quant's `quantize_fp8_row` (scale math and integer rounding to e4m3), per token
(dynamic) or with the layer's static scale. `bind_fp8_fused` installs the kernels where the consuming FP8Matmul takes
the CUDA path and its scale needs nothing from other ranks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import nn

from kiln.kernels.triton_common import row_block
from kiln.kernels.triton_fp8_quant import fp8_outputs, quantize_fp8_row
from kiln.kernels.triton_jit_common import mlp_activation_row
from kiln.kernels.triton_norm import add_norm_row_rounded
from kiln.layers.linear import LinearBase
from kiln.layers.mlp import GatedMLP
from kiln.layers.quantized_input import QuantizingActivation, QuantizingNorm, normed_layers
from kiln.quant.fp8_layers import FP8Matmul


@triton.jit
def _add_norm_fp8_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, q_ptr, scale_ptr, out_scale_ptr,
    dim, stride_x, stride_r, stride_s, stride_q, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    y = add_norm_row_rounded(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, row, cols, mask, dim, stride_x, stride_r,
                             stride_s, eps, HAS_RESIDUAL, HAS_BIAS, RMS)
    quantize_fp8_row(y, mask, scale_ptr, out_scale_ptr, q_ptr, row, stride_q, cols, SCALE)


@triton.jit
def _act_fp8_kernel(x_ptr, q_ptr, scale_ptr, out_scale_ptr, dim, stride_x, stride_q, GATED: tl.constexpr,
                    SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    act = mlp_activation_row(x_ptr, row, stride_x, cols, mask, dim, GATED)
    quantize_fp8_row(act, mask, scale_ptr, out_scale_ptr, q_ptr, row, stride_q, cols, SCALE)


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} takes rows [tokens, dim] contiguous along dim, got {tuple(x.shape)} strides "
                         f"{x.stride()}")


def add_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float, rms: bool, act_scale: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [tokens, dim] -> (q [tokens, dim] float8_e4m3fn, scale float32 [tokens, 1] (act_scale None: per
    token) or act_scale as float32 [1], summed [tokens, dim]): triton_norm.add_norm, then activation_scale and
    cast_fp8 of its output."""
    _check_rows("add_norm_fp8", x)
    tokens, dim = x.shape
    q, mode, scale = fp8_outputs(tokens, dim, act_scale, x.device)
    summed = x if residual is None else torch.empty_like(x)
    if tokens:
        block, warps = row_block(dim)
        res = residual if residual is not None else x
        _add_norm_fp8_kernel[(tokens,)](
            x, res, weight, bias if bias is not None else weight, summed, q, scale, scale, dim, x.stride(0),
            res.stride(0), summed.stride(0), q.stride(0), float(eps), HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None, RMS=rms, SCALE=mode, BLOCK=block, num_warps=warps)
    return q.view(torch.float8_e4m3fn), scale, summed


def act_fp8(x: torch.Tensor, gated: bool, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP activation (x [tokens, 2 * inter] -> silu(gate) * up, or x [tokens, inter] -> gelu(x)) quantized:
    q [tokens, inter] float8_e4m3fn and scale float32 [tokens, 1] (act_scale None) or act_scale as float32 [1]."""
    _check_rows("act_fp8", x)
    tokens, dim = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    q, mode, scale = fp8_outputs(tokens, dim, act_scale, x.device)
    if tokens:
        block, warps = row_block(dim)
        _act_fp8_kernel[(tokens,)](x, q, scale, scale, dim, x.stride(0), q.stride(0), GATED=gated, SCALE=mode,
                                   BLOCK=block, num_warps=warps)
    return q.view(torch.float8_e4m3fn), scale


# ------------------------------------------------------------------------------------------ binding to a model

def _fusable(layer: LinearBase, dtype: torch.dtype) -> bool:
    matmul = layer.matmul
    return isinstance(matmul, FP8Matmul) and matmul.takes_quantized_input(layer.weight, dtype)


def bind_fp8_fused(model: nn.Module) -> int:
    """Swap the norms before QKV and a dense MLP's first projection, and a dense MLP's activation, for the kernels
    that also quantize their output, where the FP8 layer reading it would quantize on the GPU itself (decided now,
    on the placed weights: FP8Matmul.takes_quantized_input). A MoE's router reads the float norm output (that norm
    stays), and down_proj at tp > 1 with per-token scales needs the max over the ranks (its activation stays).
    KILN_FP8_FUSED=0 at load keeps every quantization in its layer. Returns how many norms and activations were
    swapped."""
    if os.environ.get("KILN_FP8_FUSED", "1") == "0":
        return 0
    swapped = 0
    for block in getattr(model, "layers", {}).values():
        dtype = block.input_norm.weight.dtype  # the residual stream's, every layer input's
        for norm_name, layer in normed_layers(block):
            if _fusable(layer, dtype):
                setattr(block, norm_name, QuantizingNorm(getattr(block, norm_name), add_norm_fp8,
                                                         layer.matmul.input_scale32))
                swapped += 1
        down = getattr(block.ffn, "down_proj", None)
        if down is not None and _fusable(down, dtype):
            block.ffn.activation = QuantizingActivation(act_fp8, isinstance(block.ffn, GatedMLP),
                                                        down.matmul.input_scale32)
            swapped += 1
    return swapped
