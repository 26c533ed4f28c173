"""Giving a built model its weight-only quantized parameters, once, when it is made (convert's meta model, build's
checks, each rank at load).

What is quantized, as TensorRT-LLM's weight-only default: every tensor- or column/row-parallel linear layer
(attention QKV and output, dense MLP) and DBRX's experts (w13, w2, each expert per output channel). What stays in
the engine dtype: the embedding, norms and the MoE router (a ReplicatedLinear), and the LM head unless the
checkpoint's `quantize_lm_head` says otherwise (TensorRT-LLM's --quantize_lm_head): then the head is quantized as a
column-parallel layer is, its vocabulary rows split over the ranks (padded rows are zeros, scale 0). A tied head
(MPT) is a separate tensor in kiln's checkpoint already, so the embedding keeps its float rows for the lookup.

A quantized layer's `weight` (or an MoE's `w13`/`w2`) becomes int8 (INT4: packed two per byte along the input
dimension), and a `<name>_scale` parameter holds one scale per output channel. The weight keeps the shard specs of
the float weight it replaces, in logical (unpacked) units, and its local logical shape (`logical_shape`) so that
convert can read and cut the full float tensor. The scale is split like the weight's output rows: with them for
column-parallel layers and for the experts' w13 (experts and ffn), whole on every rank for row-parallel layers and w2.
Each layer's matmul is bound here, so the forward pass holds no format checks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ConfigError, QuantConfig
from kiln.layers.embedding import LMHead
from kiln.layers.linear import LinearBase, ReplicatedLinear
from kiln.layers.moe import MoE
from kiln.layers.sharding import full_shape
from kiln.quant.fp8 import fp8_scheme
from kiln.quant.fp8_layers import quantize_fp8_model
from kiln.quant.group_wise import GroupWiseMethod, dequantize_groups, group_wise_method, num_groups
from kiln.quant.kv_cache import add_kv_scale_params
from kiln.quant.smoothquant import apply_smoothquant, smoothquant_method
from kiln.quant.weight_only import WeightOnlyMethod, weight_only_method

if TYPE_CHECKING:
    from kiln.kernels import KernelSet


class WeightOnlyMatmul:
    """A quantized linear layer's matmul: dequantize to the activation dtype, then F.linear (the torch path; the
    reference every kernel is held to is `x @ dequant(W).T`). Its format attributes (bits, scale, zero, group_size,
    k_offset, g_idx: the group-wise format's) are what kiln.kernels binds its GPU kernels from."""

    def __init__(self, method: WeightOnlyMethod, scale: nn.Parameter) -> None:
        self.method, self.scale = method, scale
        self.bits = method.bits
        # Per channel: no zero point, no groups, no act-order permutation.
        self.zero, self.group_size, self.k_offset, self.g_idx = None, 0, 0, None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        return F.linear(x, self.method.dequantize(weight, self.scale, x.dtype), bias)


class WeightOnlyExperts:
    """A quantized MoE's experts: the kernel set's weight-only fused MoE over int8 w13/w2 and their scales."""

    def __init__(self, method: WeightOnlyMethod, moe: MoE) -> None:
        self.method = method
        self.w13, self.w13_scale = moe.w13, moe.w13_scale
        self.w2, self.w2_scale = moe.w2, moe.w2_scale
        self.expert_start = moe.expert_start

    def __call__(self, kernels: KernelSet, x: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:  # x [tokens, hidden] -> [tokens, hidden] (this rank's part)
        return kernels.fused_moe_weight_only(x, self.w13, self.w13_scale, self.w2, self.w2_scale, weights, ids,
                                             self.expert_start, self.method.bits)


class GroupWiseMatmul:
    """A group-wise quantized linear layer's matmul (torch path): dequantize with scales and zero points per group of
    input features, then F.linear. `bits`, `scale`, `zero`, `group_size`, `k_offset` and `g_idx` are what a kernel
    binding reads."""

    def __init__(self, method: GroupWiseMethod, scale: nn.Parameter, zero: nn.Parameter, k_offset: int,
                 g_idx: nn.Parameter | None = None) -> None:
        # g_idx [in_local] int32: a published act-order checkpoint's group of each input (kiln's own GPTQ keeps groups
        # in order, kiln.quant.gptq). The kernel binding reorders such a layer first (kiln.quant.act_order).
        self.method, self.scale, self.zero, self.k_offset, self.g_idx = method, scale, zero, k_offset, g_idx
        self.bits, self.group_size = method.bits, method.group_size

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        w = dequantize_groups(weight, self.scale, self.zero, self.bits, self.group_size, x.dtype, self.k_offset,
                              self.g_idx)
        return F.linear(x, w, bias)


class GroupWiseExperts:
    """A group-wise quantized MoE's experts: the kernel set's group-wise fused MoE over w13/w2, scales and zeros."""

    def __init__(self, method: GroupWiseMethod, moe: MoE) -> None:
        self.method = method
        self.w13, self.w13_scale, self.w13_zero = moe.w13, moe.w13_scale, moe.w13_zero
        self.w2, self.w2_scale, self.w2_zero = moe.w2, moe.w2_scale, moe.w2_zero
        self.w13_k_offset, self.w2_k_offset = moe.w13.k_offset, moe.w2.k_offset
        self.expert_start = moe.expert_start

    def __call__(self, kernels: KernelSet, x: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:  # x [tokens, hidden] -> [tokens, hidden] (this rank's part)
        return kernels.fused_moe_group_wise(x, self.w13, self.w13_scale, self.w13_zero, self.w2, self.w2_scale,
                                            self.w2_zero, weights, ids, self.expert_start, self.method.bits,
                                            self.method.group_size, self.w13_k_offset, self.w2_k_offset)


def _replace(module: nn.Module, name: str, method: WeightOnlyMethod, where: str) -> None:
    """Swap the float parameter `name` of `module` ([..., out, in]) for its int8 storage and add `<name>_scale`
    ([..., out], the float dtype)."""
    old: nn.Parameter = getattr(module, name)
    logical = tuple(old.shape)
    if method.bits == 4 and logical[-1] % 2:
        raise ConfigError(f"W4A16 packs two 4-bit weights per byte along the input features, but {where}.{name} has "
                          f"{logical[-1]} input features on a rank (odd); use --weight_only_precision int8, or a tp "
                          "size that leaves an even count per rank")
    specs = getattr(old, "shard_specs", ())
    stored = nn.Parameter(torch.empty(method.stored_shape(logical), dtype=torch.int8, device=old.device),
                          requires_grad=False)
    stored.shard_specs = specs  # type: ignore[attr-defined]
    stored.logical_shape = logical  # type: ignore[attr-defined]
    stored.weight_only = method  # type: ignore[attr-defined]
    scale = nn.Parameter(torch.empty(logical[:-1], dtype=old.dtype, device=old.device), requires_grad=False)
    # The scale's dims are the weight's minus the input one: keep the splits of experts and output rows only.
    scale.shard_specs = tuple(s for s in specs if s.dim < len(logical) - 1)  # type: ignore[attr-defined]
    scale.is_weight_scale = True  # type: ignore[attr-defined]
    setattr(module, name, stored)
    setattr(module, name + "_scale", scale)


def input_start(param: nn.Parameter, where: str) -> int:
    """Where this rank's slice of the input features (the last dim) starts in the full weight (0 when unsplit)."""
    last = param.dim() - 1
    for spec in getattr(param, "shard_specs", ()):
        if spec.dim == last:
            if len(spec.segments) != 1:
                raise ConfigError(f"{where}: group-wise quantization needs one input segment per rank")
            seg = spec.segments[0]
            return seg.index * seg.local_size
    return 0


def _add_g_idx(module: nn.Module, name: str, old: nn.Parameter, where: str) -> int:
    """Act-order: `<name>_g_idx` [in_local] int32, split like the weight's input dim; returns the full input width
    (every rank keeps all group columns, since its inputs may belong to any group)."""
    if old.dim() != 2:
        raise ConfigError(f"{where}.{name}: act-order group indices (g_idx) are supported on linear layers only")
    specs = tuple(dataclasses.replace(s, dim=0) for s in getattr(old, "shard_specs", ()) if s.dim == 1)
    g_idx = nn.Parameter(torch.empty(old.shape[1], dtype=torch.int32, device=old.device), requires_grad=False)
    g_idx.shard_specs = specs  # type: ignore[attr-defined]
    setattr(module, name + "_g_idx", g_idx)
    return full_shape(old)[1]


def _replace_groups(module: nn.Module, name: str, method: GroupWiseMethod, where: str,
                    act_order: bool = False) -> None:
    """As `_replace`, for the group-wise format: int8 storage, `<name>_scale` and `<name>_zero` [..., out, groups].
    Their group columns are this rank's (`group_slice`, which convert cuts with kiln.quant.group_wise.slice_groups);
    the weight's `k_offset` says where its input slice starts inside its first group. With `act_order` the layer
    also keeps `<name>_g_idx` and every group column (`_add_g_idx`)."""
    old: nn.Parameter = getattr(module, name)
    logical, start = tuple(old.shape), input_start(old, where)
    full_in = _add_g_idx(module, name, old, where) if act_order else None
    if method.bits == 4 and logical[-1] % 2:
        raise ConfigError(f"{method.quant_algo} packs two 4-bit weights per byte along the input features, but "
                          f"{where}.{name} has {logical[-1]} input features on a rank (odd); choose a tp size that "
                          "leaves an even count per rank")
    k_offset = start % method.group_size if full_in is None else 0
    specs = getattr(old, "shard_specs", ())
    stored = nn.Parameter(torch.empty(method.stored_shape(logical), dtype=torch.int8, device=old.device),
                          requires_grad=False)
    stored.shard_specs, stored.logical_shape = specs, logical  # type: ignore[attr-defined]
    stored.weight_only, stored.k_offset = method, k_offset  # type: ignore[attr-defined]
    setattr(module, name, stored)
    groups = num_groups(logical[-1] if full_in is None else full_in, method.group_size, k_offset)
    for suffix in ("_scale", "_zero"):
        extra = nn.Parameter(torch.empty(*logical[:-1], groups, dtype=old.dtype, device=old.device),
                             requires_grad=False)
        extra.shard_specs = tuple(s for s in specs if s.dim < len(logical) - 1)  # type: ignore[attr-defined]
        extra.is_weight_scale = True  # type: ignore[attr-defined]
        if full_in is None:
            extra.group_slice = (start, logical[-1], method.group_size)  # type: ignore[attr-defined]
        setattr(module, name + suffix, extra)


def _bind(module: nn.Module, method: WeightOnlyMethod | GroupWiseMethod, where: str, act_order: bool = False) -> None:
    """The quantized parameters and matmul (or experts) of one linear layer or MoE."""
    group_wise = isinstance(method, GroupWiseMethod)
    for name in ("w13", "w2") if isinstance(module, MoE) else ("weight",):
        if group_wise:
            _replace_groups(module, name, method, where, act_order)  # type: ignore[arg-type]
        else:
            _replace(module, name, method, where)  # type: ignore[arg-type]
    if isinstance(module, MoE):
        module.run_experts = (GroupWiseExperts if group_wise else WeightOnlyExperts)(method, module)
    elif group_wise:
        module.matmul = GroupWiseMatmul(method, module.weight_scale, module.weight_zero, module.weight.k_offset,
                                        getattr(module, "weight_g_idx", None))
    else:
        module.matmul = WeightOnlyMatmul(method, module.weight_scale)


def quantize_model(model: nn.Module, quant: QuantConfig | None) -> int:
    """Give `model` the parameters and matmuls of `quant`'s weight-only format (nothing for an unquantized one), and
    its attention layers their KV-cache scales when the KV cache is quantized (kiln.quant.kv_cache). Returns how many
    layers' weights were quantized."""
    add_kv_scale_params(model, quant)
    algo = quant.quant_algo if quant is not None else None
    sq = smoothquant_method(algo)
    if sq is not None:  # SmoothQuant W8A8 (kiln.quant.smoothquant)
        return apply_smoothquant(model, sq)
    fp8 = fp8_scheme(algo)
    if fp8 is not None:  # FP8 weights and activations (kiln.quant.fp8_layers)
        return quantize_fp8_model(model, fp8)
    group_wise = group_wise_method(algo, quant.group_size if quant is not None else 0)
    method = group_wise if group_wise is not None else weight_only_method(algo)
    if method is None:
        return 0
    layers = quantized_layers(model, quant.quantize_lm_head)  # type: ignore[union-attr]
    for where, module in layers:
        _bind(module, method, where, quant.act_order)  # type: ignore[union-attr]
    return len(layers)


def quantized_layers(model: nn.Module, lm_head: bool) -> list[tuple[str, nn.Module]]:
    """(name, module) of what a weight-only format quantizes: every tensor-parallel linear layer and MoE, and with
    `lm_head` the LM head."""
    return [(where, module) for where, module in model.named_modules()
            if isinstance(module, MoE) or (isinstance(module, LinearBase) and not isinstance(module, ReplicatedLinear))
            or (lm_head and isinstance(module, LMHead))]
