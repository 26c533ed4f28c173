"""FP8 (e4m3) weights and activations, W8A8: TensorRT-LLM's `--qformat fp8` / `--enable_fp8` (quant_algo "FP8") and
its per-channel, per-token variant (quant_algo "FP8_PER_CHANNEL_PER_TOKEN", quantize.py's `fp8_pc_pt`).

The math (../shared/docs/quantization.md; vLLM's and TensorRT-LLM's FP8 recipe): a scale is the dequantization
factor amax / 448 (448 is float8_e4m3fn's largest finite value), and `q = fp8(clamp(x / scale, -448, 448))` (the cast
rounds to nearest even). A GEMM computes `y = (q_x * s_x) @ (q_w * s_w).T`, which `torch._scaled_mm` does in one
FP8 tensor-core pass on sm_89+ and the torch reference does by dequantizing both sides to the activation dtype.

- "FP8": one weight scale per tensor (per expert for DBRX's experts) and one static activation scale per linear
  layer's input, calibrated at convert (kiln.quant.fp8_calibration). A fused layer (QKV, gate/up, DBRX's w13) is one
  tensor in kiln, so its scale is already the max of its parts' scales, and every part is quantized with it.
- "FP8_PER_CHANNEL_PER_TOKEN": one weight scale per output channel and dynamic activation scales, one per token
  (the row's amax / 448), computed at run time; "FP8_PER_TENSOR_PER_TOKEN" (kiln's name) the same with one weight
  scale per tensor. A row-parallel layer's per-token scale is the max over the tp ranks' slices (one all-reduce of
  [tokens] floats), so that every tp size quantizes as one rank does.
DBRX's experts quantize their input as the scheme says and the intermediate (between w13 and w2) dynamically per
token in both schemes: the fused MoE keeps that activation inside, where no calibration can see it.

Plain torch, exact on the CPU (torch casts to and from float8_e4m3fn there); kiln.quant.apply binds the layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.quant.exact_div import divided

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_SCALE = 1e-12  # an all-zero token or tensor: any positive scale quantizes it to zeros exactly


@dataclass(frozen=True)
class FP8Scheme:
    """One FP8 format: how weights are scaled, how activations are."""

    quant_algo: str
    per_channel: bool  # weight scale per output channel (else one per tensor / per expert)
    dynamic: bool  # activation scale per token at run time (else one calibrated static scale per layer input)

    def weight_scale_shape(self, logical: tuple[int, ...]) -> tuple[int, ...]:
        """[..., out] per channel, [..., 1] per tensor (the leading dims are experts: one scale each)."""
        return tuple(logical[:-1]) if self.per_channel else (*logical[:-2], 1)

    def quantize(self, full: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full weight [..., out, in] -> q [..., out, in] float8_e4m3fn and its scale (weight_scale_shape) in
        `scale_dtype`. q is computed from the scale as stored, so that dequantize gives back what the cast chose.
        Experts are quantized one at a time (small float32 working copies)."""
        if full.dim() < 3:
            return quantize_weight(full, self.per_channel, scale_dtype)
        q = torch.empty(full.shape, dtype=FP8_DTYPE, device=full.device)
        scale = torch.empty(self.weight_scale_shape(tuple(full.shape)), dtype=scale_dtype, device=full.device)
        for e in range(full.shape[0]):
            q[e], scale[e] = quantize_weight(full[e], self.per_channel, scale_dtype)
        return q, scale

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        return q  # one byte a value: a rank's shard is stored as cut

    def stored_shape(self, logical: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(logical)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(q, scale, dtype)


FP8_SCHEMES = {
    "FP8": FP8Scheme("FP8", per_channel=False, dynamic=False),
    "FP8_PER_CHANNEL_PER_TOKEN": FP8Scheme("FP8_PER_CHANNEL_PER_TOKEN", per_channel=True, dynamic=True),
    # kiln's name (TensorRT-LLM has none): per-tensor weights, per-token activations; what a published "dynamic"
    # FP8 checkpoint (vLLM's quant_method fp8) holds, kept without requantizing its weights.
    "FP8_PER_TENSOR_PER_TOKEN": FP8Scheme("FP8_PER_TENSOR_PER_TOKEN", per_channel=False, dynamic=True),
}


def fp8_scheme(quant_algo: str | None) -> FP8Scheme | None:
    """The FP8 scheme of a checkpoint's quant_algo, or None for any other format."""
    return FP8_SCHEMES.get(quant_algo) if quant_algo is not None else None


def cast_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., k] float, scale broadcastable to it (float) -> fp8(clamp(x / scale, ±448)), divided in float32."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(w: torch.Tensor, per_channel: bool,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> q [out, in] fp8 and scale [out] (per channel) or [1] (per tensor) in `scale_dtype`."""
    wf = w.float()
    amax = wf.abs().amax(dim=-1) if per_channel else wf.abs().amax().reshape(1)
    scale = divided(amax, FP8_MAX).clamp(min=MIN_SCALE).to(scale_dtype)
    return cast_fp8(wf, scale.float().unsqueeze(-1)), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., out, in] fp8, scale [..., out] or [..., 1] -> q * scale in `dtype` (every e4m3 value is exact in
    float32, bfloat16 and float16)."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def activation_scale(x: torch.Tensor, static_scale: torch.Tensor | None) -> torch.Tensor:
    """The float32 scale that quantizes x [tokens, k]: the static one ([1]) or each token's amax / 448 ([tokens, 1])."""
    if static_scale is not None:
        return static_scale.float().reshape(1)
    return divided(x.abs().amax(dim=-1, keepdim=True).float(), FP8_MAX).clamp(min=MIN_SCALE)


def fake_quantize_activation(x: torch.Tensor, static_scale: torch.Tensor | None) -> torch.Tensor:
    """x [tokens, k] -> the values an FP8 GEMM sees, in x's dtype: fp8(x / s) * s (static or per-token s)."""
    scale = activation_scale(x, static_scale)
    return (cast_fp8(x, scale).float() * scale).to(x.dtype)
