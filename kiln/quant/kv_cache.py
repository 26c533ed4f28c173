"""INT8 and FP8 (e4m3) KV cache: the formats, their per-layer scales as model parameters, and the torch reference of
the cache write's quantization and the attention's dequantization.

A checkpoint's `quantization.kv_cache_quant_algo` is TensorRT-LLM's name, "INT8" or "FP8". Every attention layer
then holds two parameters, `k_scale` and `v_scale` ([kv_heads], this rank's heads, in the engine dtype), written by
convert's calibration (kiln.quant.kv_calibration): the dequantization scale of the keys and of the values as they
are stored in the cache (after RoPE, after clip_qkv), `amax / 127` for INT8 and `amax / 448` for FP8 (the largest
finite e4m3 value). A per-layer scale is the same value in every head; `--per_head_kv_scales` calibrates one per
head.

The contract every implementation follows (reference.write_kv_cache / paged_attention and the Triton kernels):
- write: `v = clamp(x_f32 * inv_scale, -qmax, qmax)` with `inv_scale = 1 / scale` computed once in float32 at load
  (a multiply, not a division, so every device rounds it the same); INT8 stores `round(v)` (half to even), FP8
  stores `v` rounded to e4m3 (to nearest, ties to even).
- read: `k = q * k_scale`, `v = q * v_scale` in float32 (the Triton kernel folds k_scale into the softmax scale and
  v_scale into the output: the same products, reordered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.config import ConfigError, QuantConfig
from kiln.layers.linear import kv_segment
from kiln.layers.sharding import set_shard


@dataclass(frozen=True)
class KVCacheFormat:
    """One quantized KV-cache format: TensorRT-LLM's name, the cache's torch dtype, the largest stored magnitude."""

    algo: str
    dtype: torch.dtype
    qmax: float


KV_CACHE_FORMATS = {
    "INT8": KVCacheFormat("INT8", torch.int8, 127.0),
    "FP8": KVCacheFormat("FP8", torch.float8_e4m3fn, 448.0),
}
QUANTIZED_KV_DTYPES = (torch.int8, torch.float8_e4m3fn)


def kv_cache_format(algo: str | None) -> KVCacheFormat | None:
    """The format of a checkpoint's kv_cache_quant_algo (None: the cache holds the engine dtype)."""
    if algo is None:
        return None
    if algo not in KV_CACHE_FORMATS:
        raise ConfigError(f"kv_cache_quant_algo {algo!r} is not one kiln runs; known: {', '.join(KV_CACHE_FORMATS)}")
    return KV_CACHE_FORMATS[algo]


def kv_cache_dtype(quant: QuantConfig | None, model_dtype: torch.dtype) -> torch.dtype:
    """What the paged KV cache stores: the format's 8-bit dtype, or the model's dtype."""
    fmt = kv_cache_format(quant.kv_cache_quant_algo if quant is not None else None)
    return model_dtype if fmt is None else fmt.dtype


def kv_element_size(quant: QuantConfig | None, model_dtype: torch.dtype) -> int:
    """Bytes per cached key or value element (the memory plan's unit)."""
    return torch.empty(0, dtype=kv_cache_dtype(quant, model_dtype)).element_size()


@dataclass(frozen=True)
class KVScales:
    """One layer's scales as the kernels take them: dequantization scales and their float32 reciprocals, [kv_heads]
    float32 each, on the cache's device."""

    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_inv: torch.Tensor
    v_inv: torch.Tensor

    @classmethod
    def from_scales(cls, k_scale: torch.Tensor, v_scale: torch.Tensor) -> "KVScales":
        k, v = k_scale.detach().float().contiguous(), v_scale.detach().float().contiguous()
        return cls(k, v, _reciprocal(k), _reciprocal(v))


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    # A zero scale (a head that never saw a non-zero value) stores zeros rather than NaN.
    return torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0).contiguous()


def quantize(x: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [tokens, kv_heads, head_dim] float, inv_scale [kv_heads] float32 -> the cache's `dtype` (the write's
    contract above)."""
    fmt = KV_CACHE_FORMATS["INT8" if dtype == torch.int8 else "FP8"]
    v = (x.float() * inv_scale[None, :, None]).clamp(-fmt.qmax, fmt.qmax)
    return torch.round(v).to(dtype) if dtype == torch.int8 else v.to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., kv_heads, head_dim] int8 or float8 and scale [kv_heads] -> float32 values."""
    return q.float() * scale.float()[:, None]


def add_kv_scale_params(model: nn.Module, quant: QuantConfig | None) -> int:
    """Give every attention layer its `k_scale` and `v_scale` parameters ([local kv heads], the model dtype, split
    like the kv heads) when `quant` quantizes the KV cache; returns how many layers got them."""
    if kv_cache_format(quant.kv_cache_quant_algo if quant is not None else None) is None:
        return 0
    from kiln.layers.attention import Attention  # the layer module imports the kernels, which import this one

    count = 0
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        mapping = module.mapping
        total_kv = module.total_kv_heads
        for name in ("k_scale", "v_scale"):
            param = nn.Parameter(torch.ones(module.num_kv_heads, dtype=module.qkv_proj.weight.dtype,
                                            device=module.qkv_proj.weight.device), requires_grad=False)
            set_shard(param, 0, kv_segment(total_kv, 1, mapping.tp_size, mapping.tp_rank))
            param.is_kv_scale = True  # type: ignore[attr-defined]
            module.register_parameter(name, param)
        count += 1
    return count


def bind_kv_scales(model: nn.Module) -> None:
    """After loading: hand each attention layer that has KV scale parameters its KVScales (the reciprocals
    computed once here, so neither the forward pass nor a CUDA graph computes them again)."""
    from kiln.layers.attention import Attention

    for module in model.modules():
        if isinstance(module, Attention) and hasattr(module, "k_scale"):
            module.kv_scales = KVScales.from_scales(module.k_scale, module.v_scale)
