"""SmoothQuant W8A8: INT8 weights and INT8 activations, as TensorRT-LLM's `--smoothquant ALPHA` with its
`--per_token` / `--per_channel` switches (../shared/docs/quantization.md, SmoothQuant).

The four formats, under TensorRT-LLM's quant_algo names:

    W8A8_SQ_PER_TENSOR_PLUGIN             one static activation scale per layer, one weight scale per layer
    W8A8_SQ_PER_CHANNEL                   one static activation scale per layer, one weight scale per output channel
    W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN   one dynamic activation scale per token, one weight scale per layer
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN  one dynamic activation scale per token, one weight scale per output channel

Scales are symmetric over 127 (`scale = amax / 127`, `q = clamp(round(v / scale), -127, 127)`), for weights and
activations alike. A layer computes `y = (q_x @ q_w.T) * a_scale[token or 1] * w_scale[out] + bias`, the integer
product exact in int32 (CUDA: torch._int_mm) or float64 (CPU).

Smoothing (applied by convert, kiln.quant.sq_calibration) moves activation outliers into the weights:
`X W^T = (X / s)(W * s)^T` with `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`. For QKV and the first MLP projection
the `1 / s` is folded into the norm before them; for the attention output and down projections it is a runtime
`smoother` (`1 / s`, multiplied onto the activation before it is quantized).

What is quantized: every column/row-parallel linear layer and DBRX's experts (w13 with one static or per-token scale
for the MoE input, w2 with a per-expert smoother and, static, a per-expert activation scale). The embedding, the LM
head, the norms and the MoE router (its weight multiplied by `s`, in the engine dtype) stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from kiln.layers.linear import LinearBase, ReplicatedLinear, RowParallelLinear
from kiln.layers.moe import MoE
from kiln.layers.sharding import ShardSpec
from kiln.quant.sq_math import QMAX, int8_matmul, quantize_activation, quantize_weight, sq_linear  # noqa: F401
from kiln.quant.weight_only import per_expert

if TYPE_CHECKING:
    from kiln.kernels import KernelSet

# quant_algo -> (per_token activations, per_channel weights); the same names as kiln.config.SMOOTHQUANT_ALGOS.
SQ_ALGOS = {
    "W8A8_SQ_PER_TENSOR_PLUGIN": (False, False),
    "W8A8_SQ_PER_CHANNEL": (False, True),
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": (True, False),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (True, True),
}


def sq_algo(per_token: bool, per_channel: bool) -> str:
    """The quant_algo of TensorRT-LLM's `--smoothquant` with `--per_token` / `--per_channel`."""
    return next(name for name, modes in SQ_ALGOS.items() if modes == (per_token, per_channel))


@dataclass(frozen=True)
class SmoothQuantMethod:
    """One SmoothQuant format: what convert quantizes (its `quantize`/`pack` are convert's weight-only interface)."""

    quant_algo: str
    per_token: bool
    per_channel: bool

    def quantize(self, full: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full (smoothed) weight [..., out, in] -> q [..., out, in] int8 and scale [..., out]; experts one by one
        (a per-tensor scale is per expert)."""
        return per_expert(full, lambda w: quantize_weight(w, self.per_channel, scale_dtype), scale_dtype)

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def dequantize(self, stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stored.to(dtype) * scale.to(dtype).unsqueeze(-1)


def smoothquant_method(quant_algo: str | None) -> SmoothQuantMethod | None:
    if quant_algo not in SQ_ALGOS:
        return None
    per_token, per_channel = SQ_ALGOS[quant_algo]
    return SmoothQuantMethod(quant_algo, per_token, per_channel)


class SmoothQuantMatmul:
    """A W8A8 linear layer's matmul (bound once at load; the forward pass holds no format checks). `act_scale` is
    None for per-token activations, `smoother` None where the smoothing lives in the norm before the layer."""

    def __init__(self, w_scale: nn.Parameter, act_scale: nn.Parameter | None,
                 smoother: nn.Parameter | None) -> None:
        self.w_scale, self.act_scale, self.smoother = w_scale, act_scale, smoother

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        return sq_linear(x, weight, self.w_scale, self.act_scale, self.smoother, bias)


class SmoothQuantExperts:
    """A W8A8 MoE's experts: the kernel set's W8A8 fused MoE (the torch reference, reference.fused_moe_sq, or the
    Triton one, kiln.kernels.triton_moe_w8a8)."""

    def __init__(self, moe: MoE, per_token: bool) -> None:
        self.moe, self.per_token = moe, per_token

    def __call__(self, kernels: KernelSet, x: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:  # x [tokens, hidden] -> [tokens, hidden] (this rank's part)
        m = self.moe
        return kernels.fused_moe_sq(x, m.w13, m.w13_scale, None if self.per_token else m.w13_act_scale,
                                    m.w2, m.w2_scale, None if self.per_token else m.w2_act_scale, m.w2_smoother,
                                    weights, ids, m.expert_start)


def _float_param(module: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 specs: tuple[ShardSpec, ...]) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.shard_specs = specs  # type: ignore[attr-defined]
    setattr(module, name, param)
    return param


def _int8_weight(module: nn.Module, name: str, method: SmoothQuantMethod) -> tuple[nn.Parameter, tuple]:
    """Swap the float parameter `name` ([..., out, in]) for int8 storage and add `<name>_scale` ([..., out])."""
    old: nn.Parameter = getattr(module, name)
    logical, specs = tuple(old.shape), getattr(old, "shard_specs", ())
    stored = nn.Parameter(torch.empty(logical, dtype=torch.int8, device=old.device), requires_grad=False)
    stored.shard_specs = specs  # type: ignore[attr-defined]
    stored.logical_shape = logical  # type: ignore[attr-defined]
    stored.weight_only = method  # type: ignore[attr-defined]  (convert quantizes the full weight through it)
    setattr(module, name, stored)
    scale = _float_param(module, name + "_scale", logical[:-1], old.dtype, old.device,
                         tuple(s for s in specs if s.dim < len(logical) - 1))
    scale.is_weight_scale = True  # type: ignore[attr-defined]
    return old, specs


def _moved(specs: tuple[ShardSpec, ...], dim: int, new_dim: int) -> tuple[ShardSpec, ...]:
    """The weight's split of dimension `dim`, re-aimed at dimension `new_dim` of a smoother or scale."""
    return tuple(ShardSpec(new_dim, s.segments, s.pad) for s in specs if s.dim == dim)


def _quantize_linear(module: LinearBase, method: SmoothQuantMethod) -> None:
    old, specs = _int8_weight(module, "weight", method)
    act = _float_param(module, "act_scale", (1,), old.dtype, old.device, ())
    smoother = None
    if isinstance(module, RowParallelLinear):  # its input is not a norm's output: smoothed at run time
        smoother = _float_param(module, "smoother", (module.in_features,), old.dtype, old.device,
                                _moved(specs, 1, 0))
    module.matmul = SmoothQuantMatmul(module.weight_scale, None if method.per_token else act, smoother)


def _quantize_moe(moe: MoE, method: SmoothQuantMethod) -> None:
    old13, _ = _int8_weight(moe, "w13", method)
    old2, specs2 = _int8_weight(moe, "w2", method)
    _float_param(moe, "w13_act_scale", (1,), old13.dtype, old13.device, ())
    experts = _moved(specs2, 0, 0)
    _float_param(moe, "w2_act_scale", (old2.shape[0],), old2.dtype, old2.device, experts)
    _float_param(moe, "w2_smoother", (old2.shape[0], old2.shape[2]), old2.dtype, old2.device,
                 experts + _moved(specs2, 2, 1))
    moe.run_experts = SmoothQuantExperts(moe, method.per_token)


def apply_smoothquant(model: nn.Module, method: SmoothQuantMethod) -> int:
    """Give `model` the parameters and matmuls of `method`'s W8A8 format. Returns how many layers were quantized."""
    count = 0
    for _, module in list(model.named_modules()):
        if isinstance(module, LinearBase) and not isinstance(module, ReplicatedLinear):
            _quantize_linear(module, method)
            count += 1
        elif isinstance(module, MoE):
            _quantize_moe(module, method)
            count += 1
    return count

