"""SmoothQuant W8A8's arithmetic in plain torch (kiln.quant.smoothquant describes the formats): symmetric INT8
quantization of weights and activations over 127, the exact INT8 product, and one W8A8 linear layer. Kept apart
from the layer code so that the torch reference kernels (kiln.kernels.reference) can use it without importing
layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.quant.exact_div import divided

QMAX = 127.0


def quantize_weight(w: torch.Tensor, per_channel: bool,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> q [out, in] int8 and scale [out] in `scale_dtype` (per tensor: every entry the same). q
    is computed from the scale as stored, so that q * scale is exactly what the rounding chose."""
    wf = w.float()
    amax = wf.abs().amax(dim=-1) if per_channel else wf.abs().amax().expand(wf.shape[0])
    scale = divided(amax, QMAX).to(scale_dtype)  # [out]
    stored = scale.float().unsqueeze(-1)
    safe = torch.where(stored == 0, torch.ones_like(stored), stored)
    q = torch.clamp(torch.round(wf / safe), -QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_activation(x: torch.Tensor, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] -> q [tokens, in] int8 and its scale [tokens, 1] float32: the static per-tensor `static_scale`
    ([1]) when given, else each token's own amax / 127 (an all-zero token gets scale 1)."""
    xf = x.float()
    if static_scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax == 0, torch.ones_like(amax), divided(amax, QMAX))
    else:
        scale = static_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    q = torch.clamp(torch.round(xf / scale), -QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """qx [tokens, in] int8 @ qw [out, in] int8 ^T -> [tokens, out] float32, exact up to the final rounding:
    torch._int_mm (int32 accumulation) on CUDA, float64 on the CPU (|sum| < 2^53)."""
    if qx.is_cuda:
        rows = qx.shape[0]
        padded = max(32, -(-rows // 8) * 8)  # _int_mm wants more than 16 rows, a multiple of 8
        if padded != rows:
            qx = F.pad(qx, (0, 0, 0, padded - rows))
        return torch._int_mm(qx, qw.t())[:rows].float()
    return (qx.double() @ qw.double().t()).float()


def sq_linear(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, act_scale: torch.Tensor | None,
              smoother: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """One W8A8 linear layer: x [tokens, in] (times `smoother` [in] first) quantized, multiplied by qw [out, in],
    scaled by the activation scale and w_scale [out], plus bias; returned in x's dtype."""
    xs = x if smoother is None else x.float() * smoother.float()
    qx, a_scale = quantize_activation(xs, act_scale)
    y = int8_matmul(qx, qw) * a_scale * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
