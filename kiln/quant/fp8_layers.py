"""Giving a built model its FP8 parameters and matmuls (kiln.quant.fp8's formats), once, when it is made.

What is quantized, as for weight-only: every column/row-parallel linear layer and DBRX's experts; the embedding, LM
head, norms and router stay in the engine dtype. A layer's `weight` becomes float8_e4m3fn with `weight_scale`
beside it ([1] per tensor, [out] per channel; experts [experts, 1] / [experts, out]); a static scheme adds
`input_scale` ([1], float, the calibrated activation scale; experts: `w13_input_scale`). Per-tensor and input scales
are whole on every rank (one global amax, so tp ranks agree with tp 1); per-channel scales split with their rows.

The matmul is chosen once per layer, at its first call (the model may be built on the meta device and placed
after, so the weight's device is known only then): `torch._scaled_mm` where the device has FP8 tensor cores (sm_89+)
and the shapes suit it, else the torch reference (dequantize the weight, fake-quantize the activation through fp8
casts). On CUDA the activation is quantized by one Triton kernel (kiln.kernels.triton_fp8_quant: amax, divide and
cast in one pass, bit for bit the torch quantization) and decode steps of up to 16 rows take the Triton FP8 GEMV
(kiln.kernels.triton_fp8_gemv) instead of _scaled_mm; KILN_FP8_GEMV=0 at load keeps _scaled_mm for them.
Where the layer before quantizes for it (kiln.kernels.triton_fp8_fused: the norm before QKV and the first MLP
projection, the MLP activation before down_proj), the matmul gets a QuantizedActivation and skips its own.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.distributed.collectives import tp_all_reduce_max, tp_size
from kiln.kernels.reference import fused_moe_fp8  # noqa: F401  (its torch path, named here as before)
from kiln.layers.quantized_input import QuantizedActivation
from kiln.quant.fp8 import FP8Scheme, activation_scale, cast_fp8, dequantize

if TYPE_CHECKING:
    from kiln.kernels import KernelSet


def fp8_gemm_available(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or newer, with torch's _scaled_mm."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            and hasattr(torch, "_scaled_mm"))


def scaled_mm_fits(scheme: FP8Scheme, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """_scaled_mm needs K and N multiples of 16; row-wise scales (per channel/token) need sm_90 and bf16 output."""
    n, k = weight.shape
    if n % 16 or k % 16 or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return not row_wise(scheme) or (dtype == torch.bfloat16
                                    and torch.cuda.get_device_capability(weight.device) >= (9, 0))


def row_wise(scheme: FP8Scheme) -> bool:
    """Whether _scaled_mm gets row-wise scales ([M, 1] and [1, N]) rather than two scalars."""
    return scheme.per_channel or scheme.dynamic


class FP8Matmul:
    """An FP8 linear layer's matmul: x [tokens, in] -> [tokens, out] in x's dtype; x float, or already quantized
    (a QuantizedActivation: q [tokens, in] fp8 and its float32 scale, as this layer's own quantization gives)."""

    def __init__(self, scheme: FP8Scheme, weight_scale: nn.Parameter, input_scale: nn.Parameter | None,
                 split_input: bool = False, use_scaled_mm: bool | None = None) -> None:
        """use_scaled_mm None: chosen at the first call (bind); True / False: that path (tests)."""
        self.scheme, self.weight_scale, self.input_scale = scheme, weight_scale, input_scale
        # A row-parallel layer's rank holds a slice of each token: its per-token scale is the max over the ranks,
        # so that every tp size quantizes exactly as one rank does.
        self.split_input = split_input and input_scale is None
        self.run: Callable[..., torch.Tensor] | None = None
        if use_scaled_mm is not None:
            self.run = self.scaled_mm if use_scaled_mm else self.reference
        self.quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.gemv_rows = 0  # decode steps of up to this many rows: the Triton FP8 GEMV (CUDA)

    def __call__(self, x: torch.Tensor | QuantizedActivation, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantize is None:
            self.bind(weight, x.dtype)
        return self.run(x, weight, bias)

    def takes_quantized_input(self, weight: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the kernel before this layer may quantize its input for it (kiln.kernels.triton_fp8_fused): the
        layer is bound now (on the placed weight; `dtype` the activations') and takes the CUDA path, whose own
        quantization is the Triton one that kernel repeats bit for bit, and its scale needs no max over the ranks (a
        row-parallel layer's per-token scale at tp > 1)."""
        if self.quantize is None:
            self.bind(weight, dtype)
        return (self.run == self.scaled_mm and self.quantize == self.triton_quantize
                and not (self.split_input and tp_size() > 1))

    def bind(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        """Chosen once, at the first call on the placed weight (a model may be made on the meta device and placed
        after): _scaled_mm where it runs, else the reference; on CUDA the input quantized by one Triton kernel
        (triton_fp8_quant) and decode rows on the Triton FP8 GEMV (KILN_FP8_GEMV=0: _scaled_mm for them too)."""
        on_gpu = weight.device.type == "cuda"
        if self.run is None:
            fast = fp8_gemm_available(weight.device) and scaled_mm_fits(self.scheme, weight, dtype)
            self.run = self.scaled_mm if fast else self.reference
        if on_gpu and self.run == self.scaled_mm and os.environ.get("KILN_FP8_GEMV", "1") != "0":
            self.gemv_rows = 16
        # float32 copies made once: casting the model-dtype scales on every call is a kernel launch each
        self.weight_scale32 = self.weight_scale.float().reshape(-1)
        # _scaled_mm's weight scale: [1, N] for row-wise scales (a per-tensor one repeated), else a scalar
        self.scale_b = (self.weight_scale32.reshape(1, -1).expand(1, weight.shape[0]).contiguous()
                        if row_wise(self.scheme) else self.weight_scale32.reshape(()))
        self.input_scale32 = None if self.input_scale is None else self.input_scale.float().reshape(1)
        self.quantize = self.triton_quantize if on_gpu else self.torch_quantize
        if self.gemv_rows:
            from kiln.kernels.triton_common import split_counters

            split_counters(weight.device)  # now, not first inside a CUDA graph capture (the GEMV's split-K)

    def reference(self, x: torch.Tensor | QuantizedActivation, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
        """The exact torch reference: `fq(x) @ dequant(W).T + b` in x's dtype."""
        xq, scale, dtype, lead = self.quantized(x, self.torch_quantize)
        fq = (xq.float() * scale).to(dtype)
        return F.linear(fq, dequantize(weight, self.weight_scale, dtype), bias).reshape(*lead, -1)

    @staticmethod
    def quantized(x: torch.Tensor | QuantizedActivation, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.dtype, torch.Size]:
        """x [..., K] (float: quantized here by `quantize`; or as the layer before quantized it) -> (q [M, K] fp8,
        its scale [1] or [M, 1] float32, the output dtype, x's leading dims)."""
        if isinstance(x, QuantizedActivation):
            return x.q, x.scale, x.dtype, x.q.shape[:-1]
        q, scale = quantize(x.reshape(-1, x.shape[-1]))
        return q, scale, x.dtype, x.shape[:-1]

    def activation_scale(self, x: torch.Tensor) -> torch.Tensor:  # x [tokens, k] -> [1] or [tokens, 1] float32
        scale = activation_scale(x, self.input_scale)
        return tp_all_reduce_max(scale) if self.split_input else scale

    def torch_quantize(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x2 [M, K] -> (q [M, K] fp8, scale [1] or [M, 1] float32)."""
        scale = self.activation_scale(x2)
        return cast_fp8(x2, scale).contiguous(), scale

    def triton_quantize(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torch_quantize in one kernel (the per-token amax, the division, the cast); a row-parallel layer at tp > 1
        computes its scale first (the max over the ranks) and passes it in."""
        from kiln.kernels.triton_fp8_quant import quantize_fp8_rows

        given = self.input_scale32
        if self.split_input and tp_size() > 1:
            given = self.activation_scale(x2)
        return quantize_fp8_rows(x2, given)

    def scaled_mm(self, x: torch.Tensor | QuantizedActivation, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
        """x quantized, then one FP8 GEMM: A row-major [M, K] fp8, B = W.T column-major [K, N] (W is stored [N, K]
        row-major); decode rows on the Triton GEMV instead where bound."""
        xq, scale_a, dtype, lead = self.quantized(x, self.quantize)  # [M, K] fp8, [1] or [M, 1] float32
        m = xq.shape[0]
        if m <= self.gemv_rows:
            from kiln.kernels.triton_fp8_gemv import fp8_gemv

            return fp8_gemv(xq, scale_a, weight, self.weight_scale32, bias, dtype).reshape(*lead, -1)
        # row-wise: scale_a [M, 1] beside scale_b [1, N]; else both scalars
        scale_a = scale_a.expand(m, 1).contiguous() if row_wise(self.scheme) else scale_a.reshape(())
        y = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=self.scale_b, bias=bias, out_dtype=dtype)
        return y.reshape(*lead, -1)


class FP8Experts:
    """A quantized MoE's experts: the kernel set's FP8 fused MoE (the torch reference, reference.fused_moe_fp8, which
    reads the chosen experts on the host, or the Triton one on GPUs with FP8 tensor cores)."""

    def __init__(self, moe: nn.Module) -> None:
        self.moe = moe

    def __call__(self, kernels: KernelSet, x: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:  # x [tokens, hidden] -> [tokens, hidden] (this rank's part)
        m = self.moe
        return kernels.fused_moe_fp8(x, m.w13, m.w13_scale, m.w2, m.w2_scale, getattr(m, "w13_input_scale", None),
                                     weights, ids, m.expert_start)


def _replace_weight(module: nn.Module, name: str, scheme: FP8Scheme) -> None:
    """Swap the float parameter `name` ([..., out, in]) for fp8 storage and add `<name>_scale`."""
    old: nn.Parameter = getattr(module, name)
    logical = tuple(old.shape)
    specs = getattr(old, "shard_specs", ())
    stored = nn.Parameter(torch.empty(logical, dtype=torch.float8_e4m3fn, device=old.device), requires_grad=False)
    stored.shard_specs = specs  # type: ignore[attr-defined]
    stored.logical_shape = logical  # type: ignore[attr-defined]
    # Convert quantizes any parameter that carries a `weight_only` method (quantize/pack): the FP8 scheme is one.
    stored.weight_only = scheme  # type: ignore[attr-defined]
    scale = nn.Parameter(torch.empty(scheme.weight_scale_shape(logical), dtype=old.dtype, device=old.device),
                         requires_grad=False)
    # Per channel: the splits of experts and output rows; per tensor: only the experts' (one global amax each).
    keep = len(logical) - (1 if scheme.per_channel else 2)
    scale.shard_specs = tuple(s for s in specs if s.dim < keep)  # type: ignore[attr-defined]
    scale.is_weight_scale = True  # type: ignore[attr-defined]
    setattr(module, name, stored)
    setattr(module, name + "_scale", scale)


def _input_scale(module: nn.Module, name: str, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A static activation scale [1], whole on every rank (calibrated at tp 1 over the full input)."""
    scale = nn.Parameter(torch.empty(1, dtype=dtype, device=device), requires_grad=False)
    scale.is_input_scale = True  # type: ignore[attr-defined]
    setattr(module, name, scale)
    return scale


def quantize_fp8_model(model: nn.Module, scheme: FP8Scheme) -> int:
    """Give `model` FP8 parameters and matmuls; returns how many layers were quantized."""
    from kiln.layers.linear import LinearBase, ReplicatedLinear, RowParallelLinear
    from kiln.layers.moe import MoE

    count = 0
    for _, module in list(model.named_modules()):
        if isinstance(module, LinearBase) and not isinstance(module, ReplicatedLinear):
            dtype, device = module.weight.dtype, module.weight.device
            _replace_weight(module, "weight", scheme)
            inp = None if scheme.dynamic else _input_scale(module, "input_scale", dtype, device)
            module.matmul = FP8Matmul(scheme, module.weight_scale, inp, isinstance(module, RowParallelLinear))
            count += 1
        elif isinstance(module, MoE):
            dtype, device = module.w13.dtype, module.w13.device
            _replace_weight(module, "w13", scheme)
            _replace_weight(module, "w2", scheme)
            if not scheme.dynamic:
                _input_scale(module, "w13_input_scale", dtype, device)
            module.run_experts = FP8Experts(module)
            count += 1
    return count
