"""KV-cache scales published with a Hugging Face checkpoint: the `k_scale` and `v_scale` tensors that vLLM reads and
llm-compressor (and AutoFP8) write beside each attention module (`<attention>.k_scale`, one float32 per layer: the FP8
dequantization scale, amax / 448). With `--fp8_kv_cache`, convert takes them instead of calibrating; without it they
are left unread (as vLLM does unless its kv_cache_dtype is fp8). Older checkpoints' single `kv_scale` (one scale for K
and V) is read the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.checkpoint.hf_reader import CheckpointError
from kiln.models.family import find_rule, sources_for

# Checkpoint tensors the weight map does not read but that are not unexpected (HFWeightSource skips them).
PUBLISHED_SCALE_PATTERNS = (r"\.(k_scale|v_scale|kv_scale)$",)


def _attention_prefix(source: Any, layer: int) -> str:
    """The Hugging Face name of layer `layer`'s attention module: its fused QKV weight's name less the last two
    parts (`transformer.blocks.0.attn.Wqkv.weight` -> `transformer.blocks.0.attn`)."""
    name = f"layers.{layer}.attn.qkv_proj.weight"
    return sources_for(find_rule(source.rules, name), name)[0].rsplit(".", 2)[0]


def _scalar(checkpoint: Any, name: str) -> torch.Tensor:
    value = checkpoint.get(name).float().flatten()
    if value.numel() != 1 or not torch.isfinite(value).all() or value.item() <= 0:
        raise CheckpointError(f"{name} in {checkpoint.dir} should hold one positive scale, got {value.numel()} "
                              "values or a non-positive one; the file is damaged or not a per-tensor FP8 KV scale")
    return value


def published_kv_scales(source: Any, num_layers: int, kv_heads: int) -> dict[str, torch.Tensor] | None:
    """{"layers.<i>.attn.k_scale" / "v_scale": full [kv_heads] float32} from the checkpoint's published scales, or
    None when it has none; a checkpoint with some layers' scales and not others' is an error."""
    checkpoint = getattr(source, "checkpoint", None)
    if checkpoint is None:
        return None
    present = checkpoint.names()
    scales: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for layer in range(num_layers):
        prefix = _attention_prefix(source, layer)
        for which in ("k_scale", "v_scale"):
            name = next((n for n in (f"{prefix}.{which}", f"{prefix}.kv_scale") if n in present), None)
            if name is None:
                missing.append(f"{prefix}.{which}")
                continue
            scales[f"layers.{layer}.attn.{which}"] = _scalar(checkpoint, name).expand(kv_heads).clone()
    if not scales:
        return None
    if missing:
        raise CheckpointError(f"{checkpoint.dir} has published KV-cache scales for some layers but lacks "
                              f"{', '.join(missing[:4])}; the checkpoint is incomplete")
    return scales
