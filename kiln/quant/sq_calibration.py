"""SmoothQuant's calibration and smoothing, done by convert before it quantizes (kiln.quant.smoothquant).

Calibration runs the float model (tp 1, kiln.quant.kv_calibration's windows of kiln/eval/data/calibration.txt or
--calib_dataset, never the held-out text) and records the per-channel absmax of every quantized layer's input:
each column/row-parallel linear layer's, the MoE's input (what the experts' w13 read) and, per expert, the GLU
activation the expert's w2 reads. Dummy weights (no tokenizer) get absmax 1 everywhere (speed measurements only).

Smoothing then serves convert smoothed full tensors by name (`SmoothedSource`). Per layer and group:

    s_j = clamp(max|X_j|^alpha / max|W_j|^(1 - alpha), 1e-5)    (s_j = 1 for a channel calibration never saw)
    norm before QKV / first MLP projection:  weight / s, bias / s  (the router too reads it: its weight * s)
    QKV, gate_up / up_proj, experts' w13:    weight * s (columns)
    o_proj, down_proj, each expert's w2:     weight * s, and the runtime smoother 1 / s
    static activation scale:                 max_j(max|X_j| / s_j) / 127, the smoothed input's amax

max|W_j| is over every row of the weights the group feeds (all experts for w13; one expert's rows for its w2).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kiln.config import ConfigError, ModelConfig
from kiln.kernels import select_kernels
from kiln.layers.linear import LinearBase, ReplicatedLinear
from kiln.layers.moe import MoE
from kiln.layers.sharding import full_shape
from kiln.quant.kv_calibration import KVCalibration, calibration_windows, float_model, run_windows
from kiln.quant.smoothquant import QMAX, SQ_ALGOS

MIN_SCALE = 1e-5
LAYER = re.compile(r"layers\.(\d+)\.(.+)")


class _AmaxObserver:
    """Per-channel absmax of inputs, keyed by name: [in] for a linear layer and the MoE input, [E, ffn] for the
    experts' GLU activations (one row per local expert)."""

    def __init__(self) -> None:
        self.amax: dict[str, torch.Tensor] = {}

    def record(self, key: str, value: torch.Tensor) -> None:
        old = self.amax.get(key)
        self.amax[key] = value if old is None else torch.maximum(old, value)

    def linear_hook(self, key: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self.record(key, inputs[0].detach().abs().float().amax(dim=0).cpu())
        return hook

    def experts(self, key: str, moe: MoE) -> Any:
        """A float run_experts that also records the GLU activation's absmax per expert."""
        def run(kernels: Any, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            self.record(key + ".w13", x.detach().abs().float().amax(dim=0).cpu())
            out = torch.zeros_like(x, dtype=torch.float32)
            acts = torch.zeros(moe.w2.shape[0], moe.w2.shape[2])  # [E, ffn]; unchosen experts stay 0
            ffn = moe.w13.shape[1] // 2
            for e in torch.unique(ids).tolist():
                token_idx, slot = torch.where(ids == e)
                gate_up = x[token_idx] @ moe.w13[e].t()
                act = F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]
                acts[e] = act.abs().float().amax(dim=0).cpu()
                out.index_add_(0, token_idx, (act @ moe.w2[e].t()).float() * weights[token_idx, slot, None])
            self.record(key + ".w2", acts)
            return out.to(x.dtype)
        return run


@torch.inference_mode()
def calibrate_input_amax(family: Any, config: ModelConfig, source: Any, tokenizer: Any, calib: KVCalibration,
                         progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the float model over the calibration windows; return the absmax of every quantized layer's input by
    name (see _AmaxObserver) and a summary for the checkpoint's provenance."""
    calib.validate()
    device = torch.device(calib.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_config = config if device.type == "cuda" else dataclasses.replace(config, dtype="float32")
    windows = calibration_windows(tokenizer, calib, config.max_position_embeddings)
    model = float_model(family, run_config, source, device)
    observer = _AmaxObserver()
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and not isinstance(module, ReplicatedLinear):
            module.register_forward_pre_hook(observer.linear_hook(name))
        elif isinstance(module, MoE):
            module.run_experts = observer.experts(name, module)
    run_windows(model, select_kernels(device), windows, device, progress, desc="calibrate SmoothQuant")
    summary = {"text": str(calib.text_path().name if calib.dataset is None else calib.text_path()),
               "samples": len(windows), "tokens_per_sample": len(windows[0]), "device": device.type}
    return observer.amax, summary


@dataclass
class _Group:
    """One smoothing group of a layer: the input it smooths and what its factor touches (suffixes of the layer's
    parameter names)."""

    amax_key: str  # suffix of the recorded input absmax
    weights: tuple[str, ...]  # multiplied by s along their input dimension; the first gives max|W_j|
    folded: tuple[str, ...] = ()  # divided by s (the norm's weight and bias)
    scaled: tuple[str, ...] = ()  # multiplied by s without counting in max|W_j| (the router)
    act_scale: str = ""
    smoother: str = ""
    per_expert: bool = False  # w2: factors [E, ffn], one static activation scale per expert


def _groups(suffixes: set[str]) -> list[_Group]:
    """The smoothing groups of one decoder layer, from its parameter names."""
    groups = [_Group("attn.qkv_proj", ("attn.qkv_proj.weight",), ("input_norm.weight", "input_norm.bias"),
                     act_scale="attn.qkv_proj.act_scale"),
              _Group("attn.o_proj", ("attn.o_proj.weight",), act_scale="attn.o_proj.act_scale",
                     smoother="attn.o_proj.smoother")]
    norm = ("post_attn_norm.weight", "post_attn_norm.bias")
    if "ffn.w13" in suffixes:
        groups += [_Group("ffn.w13", ("ffn.w13",), norm, ("ffn.router.weight",), act_scale="ffn.w13_act_scale"),
                   _Group("ffn.w2", ("ffn.w2",), act_scale="ffn.w2_act_scale", smoother="ffn.w2_smoother",
                          per_expert=True)]
    else:
        first = "ffn.gate_up_proj" if "ffn.gate_up_proj.weight" in suffixes else "ffn.up_proj"
        groups += [_Group(first, (first + ".weight",), norm, act_scale=first + ".act_scale"),
                   _Group("ffn.down_proj", ("ffn.down_proj.weight",), act_scale="ffn.down_proj.act_scale",
                          smoother="ffn.down_proj.smoother")]
    return groups


def smoothing_factor(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = clamp(x_amax^alpha / w_amax^(1 - alpha), 1e-5), 1 where calibration saw only zeros (float32)."""
    s = (x_amax.float().clamp(min=MIN_SCALE) ** alpha) / (w_amax.float().clamp(min=MIN_SCALE) ** (1 - alpha))
    return torch.where(x_amax > 0, s.clamp(min=MIN_SCALE), torch.ones_like(s))


def static_act_scale(x_amax: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The smoothed input's amax / 127 over its last dimension ([1], or [E] per expert); 1/127 when never seen."""
    amax = (x_amax.float() / s).amax(dim=-1).reshape(-1)
    return torch.where(amax > 0, amax, torch.ones_like(amax)) / QMAX


class SmoothedSource:
    """A convert source serving the smoothed weights and norms, the smoothers and the static activation scales by
    name; every other tensor comes from `inner` unchanged."""

    def __init__(self, inner: Any, amax: dict[str, torch.Tensor] | None, alpha: float,
                 shapes: dict[str, tuple[int, ...]]) -> None:
        # amax None: dummy weights (absmax 1). shapes: every parameter's full shape by name.
        self.inner, self.amax, self.alpha, self.shapes = inner, amax, alpha, shapes
        by_layer: dict[str, set[str]] = {}
        for name in shapes:
            match = LAYER.fullmatch(name)
            if match:
                by_layer.setdefault(match.group(1), set()).add(match.group(2))
        self.roles: dict[str, tuple[str, _Group, str]] = {}  # name -> (layer, group, role)
        for layer, suffixes in by_layer.items():
            for group in _groups(suffixes):
                for role, names in (("weight", group.weights), ("fold", group.folded), ("scale", group.scaled),
                                    ("act", (group.act_scale,)), ("smoother", (group.smoother,))):
                    for suffix in names:
                        if suffix in suffixes:
                            self.roles[f"layers.{layer}.{suffix}"] = (layer, group, role)
        self.factors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _factor(self, layer: str, group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, the input absmax) of one group: [in], or [E, ffn] per expert."""
        key = (layer, group.amax_key)
        if key not in self.factors:
            name = f"layers.{layer}.{group.weights[0]}"
            w = self.inner.full_tensor(name, self.shapes[name]).float()  # [out, in] or [E, out, in]
            w_amax = w.abs().amax(dim=-2) if group.per_expert else w.abs().reshape(-1, w.shape[-1]).amax(dim=0)
            x_amax = torch.ones_like(w_amax) if self.amax is None else self.amax[f"layers.{layer}.{group.amax_key}"]
            if tuple(x_amax.shape) != tuple(w_amax.shape):
                raise ConfigError(f"calibrated input of layers.{layer}.{group.amax_key} has shape "
                                  f"{tuple(x_amax.shape)}, its weight's input is {tuple(w_amax.shape)}")
            self.factors[key] = (smoothing_factor(x_amax, w_amax, self.alpha), x_amax)
        return self.factors[key]

    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.roles:
            return self.inner.full_tensor(name, shape)
        layer, group, role = self.roles[name]
        s, x_amax = self._factor(layer, group)
        if role == "act":
            return static_act_scale(x_amax, s)
        if role == "smoother":
            return 1.0 / s
        full = self.inner.full_tensor(name, shape).float()
        s_cols = s.unsqueeze(-2) if group.per_expert else s  # w2 [E, hidden, ffn] * s [E, 1, ffn]
        return full / s if role == "fold" else full * s_cols


def with_smoothquant(plan: Any, full_params: dict[str, Any], progress: bool = True) -> Any:
    """Convert's plan with a source that serves smoothed tensors when its quantization is SmoothQuant (calibrated on
    the plan's `kv_calibration` settings, the shipped text by default); the plan itself otherwise. `full_params`:
    the tp-1 quantized model's parameters by name (their full shapes)."""
    if plan.quant.quant_algo not in SQ_ALGOS:
        return plan
    alpha = plan.quant.smoothquant_val
    model_dir = plan.provenance.get("model_dir")
    if not model_dir:
        amax, summary = None, {"text": None, "unit_absmax": True}
    else:
        from kiln.tokenizer import load_tokenizer  # only real checkpoints carry a tokenizer

        amax, summary = calibrate_input_amax(plan.family, plan.config, plan.source, load_tokenizer(model_dir),
                                             plan.kv_calibration or KVCalibration(), progress)
    source = SmoothedSource(plan.source, amax, alpha, {name: full_shape(p) for name, p in full_params.items()})
    provenance = dict(plan.provenance, smoothquant_calibration=dict(summary, alpha=alpha))
    return dataclasses.replace(plan, source=source, provenance=provenance)

