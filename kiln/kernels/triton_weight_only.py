"""Launcher of kiln's weight-only INT8/INT4 matmul on the GPU (kernels in triton_weight_only_kernels.py; contract:
`x @ dequant(W).T + bias`, the torch path of kiln.quant), and the per-layer callable that quantized linear layers
use once an engine on CUDA is loaded (`bind_weight_only`).

Two paths, by the rows of x:
- up to FUSED_MAX_ROWS (decode, batches up to 64): the fused kernel, which streams the stored bytes once per
  BLOCK_M rows and dequantizes in registers; split along K when the output blocks alone would not fill the GPU.
- more rows (prefill): one Triton pass writes the dequantized weight in x's dtype and cuBLAS multiplies it. At 2048
  tokens the GEMM costs ~10x the dequantization, so this stays within a few percent of the bf16 model's prefill.

Formats: per channel (group_size 0: signed values, one scale per row) and group-wise (unsigned values, scale and
zero per (row, group), k_offset where a rank's slice starts mid-group). Nothing syncs with the host: graph-safe.
GPTQ act-order layers (g_idx) are reordered at binding so that each group's inputs are contiguous, and gather their
inputs before the kernels (kiln.quant.act_order).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kiln.kernels.triton_common import FLOAT_DTYPES, asm_dequant, cdiv, check_device, dot_precision, dot_upcast
from kiln.kernels.triton_common import matmul_output, multiprocessor_count, next_power_of_2, split_counters
from kiln.kernels.triton_common import while_loops
from kiln.kernels.triton_gemv import last_program_counters, launch_split_reduce
from kiln.kernels.triton_weight_only_gemv import gemv_applies, launch_gemv
from kiln.kernels.triton_weight_only_configs import FUSED_MAX_ROWS, WoConfig, WoKey, default_wo_config, rows_configs
from kiln.kernels.triton_weight_only_kernels import dequantize_groups_kernel, dequantize_kernel, weight_only_kernel
from kiln.quant.act_order import gather_inputs, reorder_act_order_layers

__all__ = ["FUSED_MAX_ROWS", "ActOrderKernelMatmul", "WeightOnlyFormat", "WeightOnlyKernelMatmul", "bind_weight_only",
           "dequantize_weight", "quantized_layers", "weight_only_linear", "weight_only_matmul"]

@dataclass(frozen=True)
class WeightOnlyFormat:
    """How a layer's weight is stored: bits 8 or 4; group_size 0 (per channel) or G; k_offset (group-wise only)."""

    bits: int
    group_size: int = 0
    k_offset: int = 0



def check_format(fmt: WeightOnlyFormat, n: int, k: int, weight: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None) -> None:
    """Refuse a weight the kernels would misread, saying what is wrong (ValueError)."""
    if fmt.bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {fmt.bits}")
    if fmt.group_size == 0:
        if fmt.k_offset != 0 or zero is not None:
            raise ValueError("a per-channel weight (group_size 0) has no zero point and k_offset 0")
        if tuple(scale.shape) != (n,):
            raise ValueError(f"scale and bias must be [N] = [{n}]; got {tuple(scale.shape)}")
        return
    group = fmt.group_size
    if group < 32 or group % 32:
        raise ValueError(f"group_size must be a multiple of 32 for the Triton kernels, got {group}")
    if not 0 <= fmt.k_offset < group or (fmt.bits == 4 and fmt.k_offset % 2):
        raise ValueError(f"k_offset must be in 0..{group - 1} (even for 4 bits), got {fmt.k_offset}")
    groups = cdiv(k + fmt.k_offset, group)
    if scale.dim() != 2 or scale.shape[0] != n or scale.shape[1] < groups or scale.stride(1) != 1:
        raise ValueError(f"a group-wise scale must be [N, >= {groups}] = [{n}, ...] contiguous along groups; got "
                         f"{tuple(scale.shape)}")
    if zero is not None and (zero.shape != scale.shape or zero.stride() != scale.stride()):
        raise ValueError(f"zero must have the scale's shape and strides; got {tuple(zero.shape)}")


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: WeightOnlyFormat) -> None:
    if fmt.bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {fmt.bits}")
    if x.dim() != 2 or weight.dim() != 2 or weight.dtype != torch.int8:
        raise ValueError(f"expected x [M, K] and an int8 weight [N, K or K / 2]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; the kernel takes float16, bfloat16 or float32")
    check_device(x.device)
    width = weight.shape[1] * (2 if fmt.bits == 4 else 1)
    if x.shape[1] != width:
        raise ValueError(f"x has {x.shape[1]} input features, the {fmt.bits}-bit weight holds {width}")
    if (x.shape[1] > 1 and x.stride(1) != 1) or (weight.shape[1] > 1 and weight.stride(1) != 1):
        raise ValueError("x and the weight must be contiguous along K (call .contiguous())")
    check_format(fmt, weight.shape[0], x.shape[1], weight, scale, zero)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"scale and bias must be [N] = [{weight.shape[0]}]; got bias {tuple(bias.shape)}")
    tensors = (x, weight, scale) + tuple(t for t in (zero, bias) if t is not None)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"x, weight, scale, zero and bias must be on one device; got {sorted(map(str, devices))}")


@dataclass(frozen=True)
class _Plan:
    block_m: int
    splits: int
    v_per_split: int


def _plan(rows: int, n: int, k: int, fmt: WeightOnlyFormat, config: WoConfig, sms: int) -> _Plan:
    """BLOCK_M covers the rows (16 at least, tl.dot's minimum); K is cut into config.split_k slices, or (split_k 0)
    until about two programs per SM are in flight (each keeps num_stages tiles loading), keeping at least four tiles
    per slice and the partial sums small next to the weight."""
    block_m = max(16, next_power_of_2(rows))
    steps = cdiv(k + fmt.k_offset, config.block_k)
    if config.split_k:
        splits = min(config.split_k, steps)
    else:
        programs = cdiv(n, config.block_n) * cdiv(rows, block_m)
        # fp32 partials (splits x rows x N x 4 bytes) stay under a quarter of the weight's bytes
        partial_cap = max(1, k * fmt.bits // (128 * rows))
        splits = max(1, min(cdiv(2 * sms, programs), steps // 4, partial_cap))
    per_split = cdiv(steps, splits)
    return _Plan(block_m, cdiv(steps, per_split), per_split * config.block_k)


def _launch_fused(x, weight, scale, zero, bias, fmt: WeightOnlyFormat, config: WoConfig | None = None) -> torch.Tensor:
    rows, k = x.shape
    n = weight.shape[0]
    config = config or default_wo_config(rows, fmt.bits, fmt.group_size, k + fmt.k_offset)
    plan = _plan(rows, n, k, fmt, config, multiprocessor_count(x.device))
    if config.gemv and gemv_applies(x, fmt.k_offset):
        return launch_gemv(x, weight, scale, zero, bias, fmt, config, plan)
    y, done = matmul_output(x, n, bias)
    if done:
        return y
    split = plan.splits > 1
    part = torch.empty(plan.splits, rows, n, dtype=torch.float32, device=x.device) if split else y
    bias_arg = bias if bias is not None else scale  # never read without HAS_BIAS
    zero_arg = zero if zero is not None else scale
    grid = (cdiv(n, config.block_n), plan.splits, cdiv(rows, plan.block_m))
    counters = last_program_counters(x.device, split, grid[0] * grid[2])
    last_reduces = counters is not None
    weight_only_kernel[grid](
        x, weight, scale, zero_arg, bias_arg, y, part, counters if last_reduces else part, rows, n, k,
        weight.shape[1], fmt.k_offset, plan.v_per_split, x.stride(0), weight.stride(0), scale.stride(0), y.stride(0),
        BITS=fmt.bits, GROUP=fmt.group_size, HAS_ZERO=zero is not None,
        HAS_BIAS=bias is not None and (not split or last_reduces), SPLIT=split, BLOCK_M=plan.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=fmt.k_offset == 0 and k % config.block_k == 0,
        DOT_F32=dot_upcast(x.dtype, x.device), PRECISION=dot_precision(x.dtype), LAST_REDUCES=last_reduces,
        WHILE_LOOP=while_loops(x.device), ASM=asm_dequant(x.dtype, x.device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split and not last_reduces:
        launch_split_reduce(part, bias, y)
    return y


def _check_config(config: WoConfig, fmt: WeightOnlyFormat) -> None:
    if not isinstance(config, WoConfig):
        raise ValueError(f"config must be a WoConfig, got {type(config).__name__}")
    if config.block_k < 32 or (fmt.group_size and fmt.group_size % config.block_k):
        raise ValueError(f"config block_k {config.block_k} must be >= 32 and divide the group size {fmt.group_size}")


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: WeightOnlyFormat,
                      dtype: torch.dtype) -> torch.Tensor:  # [N, K or K / 2] int8 -> [N, K] in dtype
    """The weight in `dtype`, in one Triton pass (values as the torch dequantize gives them)."""
    n, kw = weight.shape
    k = kw * (2 if fmt.bits == 4 else 1)
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    if n == 0 or k == 0:
        return out
    group = fmt.group_size
    if group and group & (group - 1) == 0:  # one group per program: scale and zero loaded once per row
        dequantize_groups_kernel[(cdiv(n, 64), cdiv(k + fmt.k_offset, group))](
            weight, scale, zero if zero is not None else scale, out, n, k, kw, fmt.k_offset, weight.stride(0),
            scale.stride(0), out.stride(0), BITS=fmt.bits, GROUP=group, HAS_ZERO=zero is not None, BLOCK_N=64,
            num_warps=4,
        )
        return out
    block_b = 64
    dequantize_kernel[(cdiv(n, 32), cdiv(kw, block_b))](
        weight, scale, zero if zero is not None else scale, out, n, k, kw, fmt.k_offset, weight.stride(0),
        scale.stride(0), out.stride(0),
        BITS=fmt.bits, GROUP=fmt.group_size, HAS_ZERO=zero is not None, BLOCK_N=32, BLOCK_B=block_b, num_warps=4,
    )
    return out


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bias: torch.Tensor | None, fmt: WeightOnlyFormat,
                       config: WoConfig | None = None) -> torch.Tensor:  # x [M, K] -> [M, N]
    """y = x @ dequant(weight).T + bias in x's dtype (fp32 accumulation): the fused kernel up to FUSED_MAX_ROWS rows
    of x (with `config`, or the default), dequantize + cuBLAS above."""
    _check(x, weight, scale, zero, bias, fmt)
    if config is not None:
        _check_config(config, fmt)
    if x.shape[0] <= FUSED_MAX_ROWS:
        return _launch_fused(x, weight, scale, zero, bias, fmt, config)
    return F.linear(x, dequantize_weight(weight, scale, zero, fmt, x.dtype), bias)


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       bits: int) -> torch.Tensor:  # x [M, K], weight [N, K or K / 2] int8, scale [N] -> [M, N]
    """Per-channel y = x @ dequant(weight, scale).T + bias (the first slice's entry point)."""
    return weight_only_matmul(x, weight, scale, None, bias, WeightOnlyFormat(bits))


class WeightOnlyKernelMatmul:
    """A quantized linear layer's matmul on CUDA: the Triton kernels over its stored weight, scale and zero (read
    from the layer's torch matmul object at binding), with a launch config per row count 0..FUSED_MAX_ROWS (the
    build's tuned choices, else the default: one tuple index per call). Rows of any count; x of any leading shape."""

    __slots__ = ("fmt", "scale", "zero", "fallback", "configs")

    def __init__(self, fmt: WeightOnlyFormat, scale: torch.Tensor, zero: torch.Tensor | None,
                 fallback: Callable[..., torch.Tensor], configs: tuple[WoConfig, ...]) -> None:
        if len(configs) != FUSED_MAX_ROWS + 1:
            raise ValueError(f"WeightOnlyKernelMatmul takes one config per row count 0..{FUSED_MAX_ROWS}")
        self.fmt, self.scale, self.zero, self.fallback, self.configs = fmt, scale, zero, fallback, configs

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.stride(-1) != 1:
            return self.fallback(x, weight, bias)  # a view the kernels do not read (never in kiln's layers)
        flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
        rows = flat.shape[0]
        if rows <= FUSED_MAX_ROWS:
            y = _launch_fused(flat, weight, self.scale, self.zero, bias, self.fmt, self.configs[rows])
        else:
            y = F.linear(flat, dequantize_weight(weight, self.scale, self.zero, self.fmt, x.dtype), bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def __repr__(self) -> str:
        return f"WeightOnlyKernelMatmul({self.fmt})"


class ActOrderKernelMatmul:
    """A reordered act-order layer's matmul on CUDA (kiln.quant.act_order): x's inputs gathered by `perm` (one
    index_select, after appending a zero column when the layout is padded; graph-safe), then the kernels over the
    reordered weight."""

    __slots__ = ("perm", "padded", "kernel")

    def __init__(self, perm: torch.Tensor, padded: bool, kernel: WeightOnlyKernelMatmul) -> None:
        self.perm, self.padded, self.kernel = perm, padded, kernel

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel(gather_inputs(x, self.perm, self.padded), weight, bias)  # [..., in] -> [..., out]

    def __repr__(self) -> str:
        return f"ActOrderKernelMatmul({self.kernel.fmt}, padded={self.padded})"


def kernel_format(matmul: object, weight: torch.Tensor) -> WeightOnlyFormat | None:
    """The format of a layer's quantized matmul object (its attributes bits, scale, zero, group_size, k_offset,
    g_idx; a reordered act-order layer's `reordered` matmul), if the kernels can read it: not with act-order g_idx
    left in place, nor a group size that is not a multiple of 32."""
    matmul = getattr(matmul, "reordered", matmul)
    bits = getattr(matmul, "bits", None)
    if bits not in (8, 4) or getattr(matmul, "g_idx", None) is not None or weight.dtype != torch.int8:
        return None
    fmt = WeightOnlyFormat(bits, int(getattr(matmul, "group_size", 0) or 0), int(getattr(matmul, "k_offset", 0)))
    k = weight.shape[1] * (2 if bits == 4 else 1)
    try:
        check_format(fmt, weight.shape[0], k, weight, matmul.scale, getattr(matmul, "zero", None))
    except ValueError:
        return None
    return fmt


def quantized_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, WeightOnlyFormat]]:
    """The layers of `model` whose quantized matmul (bits/scale/... attributes) the kernels can read, with formats."""
    found = []
    for module in model.modules():
        matmul, weight = getattr(module, "matmul", None), getattr(module, "weight", None)
        if matmul is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        fmt = kernel_format(matmul, weight)
        if fmt is not None:
            found.append((module, fmt))
    return found


def _reorder_act_order(model: torch.nn.Module) -> None:
    """Act-order layers (GPTQ desc_act, g_idx) reordered for the kernels; a warning names those padded to tiles
    (a row-parallel rank's scattered groups at tp > 1) and what their weights grew by."""
    _, padded = reorder_act_order_layers(model)
    if padded:
        more = f" and {len(padded) - 2} more" if len(padded) > 2 else ""
        warnings.warn(f"{len(padded)} act-order (desc_act) GPTQ layers hold a scattered part of each group on this "
                      f"rank (row-parallel at tp > 1): they run the Triton kernels with each group padded to tiles of "
                      f"32 inputs, which grows their weights: {'; '.join(padded[:2])}{more}", RuntimeWarning,
                      stacklevel=3)


def bind_weight_only(model: torch.nn.Module, table: dict[WoKey, WoConfig] | None = None) -> int:
    """Give every quantized linear layer of `model` the kernels can read a WeightOnlyKernelMatmul, with the configs
    of `table` (the build's tuned choices) for its shape; the rest keep their torch matmul. Act-order layers are
    reordered first (kiln.quant.act_order) and gather their inputs before the kernels. Returns how many layers were
    bound."""
    _reorder_act_order(model)
    layers = quantized_layers(model)
    for device in {module.weight.device for module, _ in layers}:
        split_counters(device)  # now, not first inside a CUDA graph capture
    for module, fmt in layers:
        n, k = module.weight.shape[0], module.weight.shape[1] * (2 if fmt.bits == 4 else 1)
        configs = rows_configs(table or {}, n, k, fmt.bits, fmt.group_size)
        matmul = module.matmul
        inner = getattr(matmul, "reordered", matmul)
        kernel = WeightOnlyKernelMatmul(fmt, inner.scale, getattr(inner, "zero", None), inner, configs)
        module.matmul = kernel if inner is matmul else ActOrderKernelMatmul(matmul.perm, matmul.padded, kernel)
    return len(layers)
