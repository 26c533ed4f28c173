"""Published quantized Hugging Face checkpoints (AutoGPTQ, AutoAWQ, ...): recognised from their config, and refused
by name until kiln loads them, instead of failing later on tensors (qweight, qzeros, scales) the model does not know.

What decides is the checkpoint's own description: `quantization_config` in config.json (transformers' layout, written
by AutoGPTQ, AutoAWQ, optimum and others) or AutoGPTQ's older `quantize_config.json` beside it. Nothing in the
directory is executed; the files are read as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.config import ConfigError

LOADER_MESSAGE = ("kiln cannot load this published quantization (it loads AutoGPTQ 4/8-bit, AutoAWQ GEMM and FP8 "
                  "checkpoints); convert the unquantized checkpoint and let kiln calibrate: --use_weight_only "
                  "--weight_only_precision int4_gptq|int4_awq [--group_size 128]")


def published_quantization(model_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's quantization description, or None for an unquantized checkpoint."""
    described = config.get("quantization_config")
    if described is None and (model_dir / "quantize_config.json").is_file():
        try:
            described = json.loads((model_dir / "quantize_config.json").read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{model_dir / 'quantize_config.json'} is not readable JSON ({err})") from err
        if isinstance(described, dict):
            described.setdefault("quant_method", "gptq")  # AutoGPTQ's own file
    if described is None:
        return None
    if not isinstance(described, dict):
        raise ConfigError(f"{model_dir}/config.json: quantization_config must be a JSON object")
    return described


def describe(q: dict[str, Any]) -> str:
    """`gptq (bits 4, group_size 128, desc_act true, sym true)`: the fields that name a published format."""
    keys = ("bits", "group_size", "desc_act", "sym", "zero_point", "version", "checkpoint_format")
    fields = ", ".join(f"{k} {json.dumps(q[k])}" for k in keys if k in q)
    return f"{q.get('quant_method', 'an unnamed method')}" + (f" ({fields})" if fields else "")


def refuse_published(model_dir: Path, config: dict[str, Any]) -> None:
    """Raise a one-line ConfigError naming the published format, when the checkpoint is a quantized one."""
    described = published_quantization(model_dir, config)
    if described is not None:
        raise ConfigError(f"{model_dir} is a quantized checkpoint, {describe(described)}: {LOADER_MESSAGE}")
