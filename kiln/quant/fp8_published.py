"""Published FP8 checkpoints (vLLM, AutoFP8, llm-compressor) read at `kiln convert`.

Such a checkpoint's config.json has a `quantization_config`, either {"quant_method": "fp8", "activation_scheme":
"static" | "dynamic"} (per-tensor weight scales) or {"quant_method": "compressed-tensors", "config_groups": {...:
{"weights": {"type": "float", "num_bits": 8, "strategy": "tensor" | "channel"}, "input_activations": {"dynamic":
bool, "strategy": "tensor" | "token"}}}}; beside each quantized linear weight (float8_e4m3fn [out, in]) sit its
`weight_scale` (float32, [] / [1] per tensor, [out] / [out, 1] per channel) and, for static activations, its
`input_scale` (float32 scalar). The attention's `k_scale`/`v_scale` are read by kiln.quant.kv_published.

kiln reads the weights dequantized (q * weight_scale) through the family's weight map, then quantizes each kiln tensor
again: a fused tensor (QKV, gate/up) gets one scale, the max of its parts' (each part's largest |q| is 448 in these
formats, so that max is amax / 448), and its parts' values are requantized to it; an unfused tensor comes back to the
same fp8 values. A static checkpoint's input scales are taken as published (a fused layer's: the max of its parts').
Without quantization flags, convert keeps the checkpoint's scheme ("FP8" static, "FP8_PER_TENSOR_PER_TOKEN" or
"FP8_PER_CHANNEL_PER_TOKEN" dynamic); with flags, the dequantized weights go into the format asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.checkpoint.hf_reader import CheckpointError
from kiln.config import ConfigError
from kiln.models.family import find_rule, sources_for
from kiln.quant.fp8 import FP8_DTYPE

SCALE_SUFFIXES = (".weight_scale", ".input_scale")


def _group(qc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """compressed-tensors: the one config group's weights and input_activations (several groups: refused)."""
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0], dict):
        raise ConfigError(f"this compressed-tensors checkpoint has {len(groups)} config groups; kiln reads one FP8 "
                          "group for every linear layer")
    return groups[0].get("weights") or {}, groups[0].get("input_activations") or {}


def published_fp8_algo(hf_config: dict[str, Any]) -> str | None:
    """The kiln quant_algo of a published FP8 checkpoint's config.json, None when it is not one."""
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        return "FP8" if qc.get("activation_scheme", "dynamic") == "static" else "FP8_PER_TENSOR_PER_TOKEN"
    if method != "compressed-tensors":
        return None
    weights, acts = _group(qc)
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        return None  # an integer compressed-tensors format: not FP8
    per_channel = weights.get("strategy") == "channel"
    if not acts.get("dynamic", False):
        if per_channel or acts.get("strategy", "tensor") != "tensor":
            raise ConfigError("this checkpoint's FP8 has per-channel weights with static activation scales, a "
                              "combination kiln does not run; kiln runs per-tensor static, or per-token dynamic")
        return "FP8"
    return "FP8_PER_CHANNEL_PER_TOKEN" if per_channel else "FP8_PER_TENSOR_PER_TOKEN"


class DequantizingCheckpoint:
    """An HFCheckpoint whose float8_e4m3fn weights read back dequantized (float32), and whose scale tensors are
    hidden from the name list (the weight map does not read them)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.dir, self.config = inner, inner.dir, inner.config
        self.algo = published_fp8_algo(inner.config)
        self._names = {n for n in inner.names() if not n.endswith(SCALE_SUFFIXES)}
        self._all = inner.names()

    def names(self) -> set[str]:
        return self._names

    def get(self, name: str) -> torch.Tensor:
        tensor = self.inner.get(name)
        if tensor.dtype != FP8_DTYPE:
            return tensor
        scale_name = name.removesuffix(".weight") + ".weight_scale"
        if scale_name not in self._all:
            raise CheckpointError(f"{name} in {self.dir} is float8 but has no {scale_name}; the checkpoint is "
                                  "incomplete")
        scale = self.inner.get(scale_name).float()
        if scale.numel() not in (1, tensor.shape[0]) or not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise CheckpointError(f"{scale_name} in {self.dir} should hold 1 or {tensor.shape[0]} positive scales, "
                                  f"got {scale.numel()} values; the file is damaged")
        return tensor.float() * scale.reshape(-1, 1)  # [out, in] * ([1, 1] or [out, 1])

    def input_scale(self, hf_weight: str) -> torch.Tensor:
        """The published static input scale ([1] float32) beside the HF weight `hf_weight`."""
        name = hf_weight.removesuffix(".weight") + ".input_scale"
        if name not in self._all:
            raise CheckpointError(f"{self.dir} is a static FP8 checkpoint but lacks {name}")
        value = self.inner.get(name).float().reshape(-1)
        if value.numel() != 1 or not (torch.isfinite(value).all() and value.item() > 0):
            raise CheckpointError(f"{name} in {self.dir} should hold one positive scale")
        return value


def published_checkpoint(checkpoint: Any) -> Any:
    """The checkpoint to read: dequantizing for a published FP8 one, the same one otherwise."""
    return DequantizingCheckpoint(checkpoint) if published_fp8_algo(checkpoint.config) else checkpoint


def published_input_scales(source: Any, names: list[str]) -> dict[str, torch.Tensor] | None:
    """{kiln "<layer>.input_scale": [1]} from a static published checkpoint (a fused layer's parts: their max), or
    None when the source is not a static published FP8 checkpoint. An MoE's experts are not published linears: refused."""
    checkpoint = getattr(source, "checkpoint", None)
    if not isinstance(checkpoint, DequantizingCheckpoint) or checkpoint.algo != "FP8":
        return None  # not published, or dynamic: static scales asked for are calibrated
    scales = {}
    for name in names:
        if not name.endswith(".input_scale"):
            raise ConfigError(f"a published static FP8 checkpoint has no input scale for {name} (its experts); "
                              "convert with --enable_fp8 --per_token for per-token activation scales")
        weight = name.removesuffix(".input_scale") + ".weight"
        parts = sources_for(find_rule(source.rules, weight), weight)
        scales[name] = torch.stack([checkpoint.input_scale(p) for p in parts]).amax(dim=0)
    return scales
