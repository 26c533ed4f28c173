"""Static FP8 activation scales ("FP8"): the per-tensor amax of each quantized linear layer's input (and of DBRX's
experts' input) over calibration text, / 448. The text, windows and float model are the KV-cache calibration's
(kiln.quant.kv_calibration: kiln/eval/data/calibration.txt or --calib_dataset, --calib_size windows of
--calib_max_seq_length tokens, never the held-out text), streamed with a progress bar; the hook is each layer's
matmul (and each MoE's run_experts), which records |x|'s max before calling the float one.

Dummy weights (no text to calibrate on) get the scale of amax 8, for speed measurements only; a published static FP8
checkpoint's own input scales are taken instead of calibrating (kiln.quant.fp8_published).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kiln.config import ConfigError, Mapping
from kiln.kernels import select_kernels
from kiln.quant.fp8 import FP8_MAX, fp8_scheme
from kiln.quant.fp8_published import published_input_scales
from kiln.quant.kv_calibration import KVCalibration, KVScaleSource, calibration_windows, float_model, run_windows

DUMMY_AMAX = 8.0


class _InputAmax:
    """Wraps a callable whose first argument after `skip` others is the activation; keeps the largest |x|."""

    def __init__(self, inner: Any, skip: int = 0) -> None:
        self.inner, self.skip, self.amax = inner, skip, torch.zeros(())

    def __call__(self, *args: Any) -> Any:
        x = args[self.skip]
        self.amax = torch.maximum(self.amax, x.detach().abs().amax().float().cpu())
        return self.inner(*args)


def _hooked_layers(model: torch.nn.Module) -> dict[str, _InputAmax]:
    """{"<layer>.input_scale" or "<moe>.w13_input_scale": recorder} for every layer FP8 quantizes."""
    from kiln.layers.linear import LinearBase, ReplicatedLinear
    from kiln.layers.moe import MoE

    hooks: dict[str, _InputAmax] = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and not isinstance(module, ReplicatedLinear):
            module.matmul = hooks[f"{name}.input_scale"] = _InputAmax(module.matmul)
        elif isinstance(module, MoE):
            module.run_experts = hooks[f"{name}.w13_input_scale"] = _InputAmax(module.run_experts, skip=1)
    return hooks


@torch.inference_mode()
def calibrate_input_scales(plan: Any, tokenizer: Any, calib: KVCalibration,
                           progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """{name: [1] float32 scale} of every static input scale, and a summary for the provenance."""
    config = plan.config
    calib.validate()
    device = torch.device(calib.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_config = config if device.type == "cuda" else dataclasses.replace(config, dtype="float32")
    windows = calibration_windows(tokenizer, calib, config.max_position_embeddings)
    if max(max(w) for w in windows) >= config.vocab_size:
        raise ConfigError("the checkpoint's tokenizer gives token ids beyond the model's vocabulary on the "
                          "calibration text; is the tokenizer this model's?")
    model = float_model(plan.family, run_config, plan.source, device)
    hooks = _hooked_layers(model)
    run_windows(model, select_kernels(device), windows, device, progress, desc="calibrate FP8 inputs")
    scales = {name: (hook.amax.clamp(min=1e-12) / FP8_MAX).reshape(1) for name, hook in hooks.items()}
    summary = {"text": str(calib.text_path().name if calib.dataset is None else calib.text_path()),
               "samples": len(windows), "tokens_per_sample": len(windows[0]), "device": device.type}
    return scales, summary


def _dummy_scales(plan: Any) -> dict[str, torch.Tensor]:
    """Every static input scale of the model, at the dummy weights' amax."""
    from kiln.checkpoint.convert import meta_model

    model = meta_model(plan.family, plan.config, Mapping(), plan.quant)
    return {name: torch.full((1,), DUMMY_AMAX / FP8_MAX) for name, p in model.named_parameters()
            if getattr(p, "is_input_scale", False)}


def with_fp8_input_scales(plan: Any, progress: bool = True) -> Any:
    """Convert's plan with a source that also serves the static FP8 input scales (calibrated, or the dummy ones);
    the plan itself for any other quantization."""
    scheme = fp8_scheme(plan.quant.quant_algo)
    if scheme is None or scheme.dynamic:
        return plan
    model_dir = plan.provenance.get("model_dir")
    base = plan.source
    while hasattr(base, "inner"):  # under the KV-scale source
        base = base.inner
    published = published_input_scales(base, list(_dummy_scales(plan)))
    if published is not None:
        scales, summary = published, {"text": None, "published_scales": True}
    elif not model_dir:
        scales, summary = _dummy_scales(plan), {"text": None, "dummy_amax": DUMMY_AMAX}
    else:
        from kiln.tokenizer import load_tokenizer  # only real checkpoints carry a tokenizer

        calib = plan.kv_calibration or KVCalibration()
        scales, summary = calibrate_input_scales(plan, load_tokenizer(model_dir), calib, progress)
    provenance = dict(plan.provenance, fp8_calibration=summary)
    return dataclasses.replace(plan, source=KVScaleSource(plan.source, scales), provenance=provenance)
