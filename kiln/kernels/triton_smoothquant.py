"""Triton kernels of SmoothQuant W8A8 (contract: kiln.quant.smoothquant's torch functions, bit for bit).

- `add_norm_quant`: the pre-norm block's residual add and LayerNorm/RMSNorm (triton_norm's math) with the INT8
  quantization of the normed row in the same pass: the norm's output never goes to memory in the float dtype, the
  QKV and first MLP projection read int8 (the smoothing is folded into the norm weights by convert).
- `smooth_quant`: a row times the runtime smoother, quantized (per token or static): the attention output before
  o_proj.
- `act_quant`: a dense MLP's activation (silu(gate) * up, or exact GELU) times down_proj's smoother, quantized, in
  the same pass: down_proj reads int8.
- `int8_gemm`: q_x [M, K] int8 @ q_w [N, K] int8 ^T with int32 accumulation and the scaling epilogue
  `acc * a_scale[m] * w_scale[n] + bias[n]`, stored in the activation dtype. Its tiles and split-K per call shape
  come from triton_smoothquant_configs (decode: narrow N tiles split along K; prefill: big tiles); int32 sums are
  exact, so every config gives the same bits.

Rounding is torch.round's (to nearest, ties to even) by the 1.5 * 2^23 trick, the divisions IEEE (div_rn), so that
the int8 values equal the torch path's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from kiln.kernels.triton_common import cdiv, multiprocessor_count, row_block, split_counters, while_loops
from kiln.kernels.triton_gemv_kernels import last_split_to_arrive, sum_splits
from kiln.kernels.triton_jit_common import mlp_activation_row
from kiln.kernels.triton_norm import add_norm_row_rounded
from kiln.kernels.triton_smoothquant_configs import Int8GemmConfig, default_int8_config
from kiln.layers.linear import LinearBase
from kiln.layers.mlp import GatedMLP
from kiln.layers.quantized_input import QuantizedActivation, QuantizingActivation, QuantizingNorm, normed_layers
from kiln.quant.smoothquant import SmoothQuantMatmul

ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)
QMAX: tl.constexpr = tl.constexpr(127.0)


@triton.jit
def _quantize_row(v, mask, scale_ptr, out_scale_ptr, q_ptr, row, stride_q, cols, PER_TOKEN: tl.constexpr):
    """Quantize one float32 row `v` (masked lanes 0): per token amax / 127 (1 for an all-zero row) or the static
    scale; store q (int8) and the row's scale (float32)."""
    if PER_TOKEN:
        amax = tl.max(tl.abs(v), axis=0)
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, QMAX))
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
    r = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -QMAX), QMAX)
    r = (r + ROUND_MAGIC) - ROUND_MAGIC
    tl.store(q_ptr + row * stride_q + cols, r.to(tl.int8), mask=mask)
    tl.store(out_scale_ptr + row, scale)


@triton.jit
def _add_norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, q_ptr, act_scale_ptr, out_scale_ptr,
    dim, stride_x, stride_r, stride_s, stride_q, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, PER_TOKEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    y = add_norm_row_rounded(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, row, cols, mask, dim, stride_x, stride_r,
                             stride_s, eps, HAS_RESIDUAL, HAS_BIAS, RMS)  # as the float path would hold it
    _quantize_row(y, mask, act_scale_ptr, out_scale_ptr, q_ptr, row, stride_q, cols, PER_TOKEN)


@triton.jit
def _smooth_quant_kernel(x_ptr, smoother_ptr, q_ptr, act_scale_ptr, out_scale_ptr, dim, stride_x, stride_q,
                         HAS_SMOOTHER: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTHER:
        v = v * tl.load(smoother_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    _quantize_row(v, mask, act_scale_ptr, out_scale_ptr, q_ptr, row, stride_q, cols, PER_TOKEN)


@triton.jit
def _act_quant_kernel(x_ptr, smoother_ptr, q_ptr, act_scale_ptr, out_scale_ptr, dim, stride_x, stride_q,
                      GATED: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
    """One row of the MLP activation: silu(gate) * up (GATED, x holds [gate; up]) or exact GELU, rounded to the model
    dtype as torch's ops leave it, times the smoother, quantized."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    act = mlp_activation_row(x_ptr, row, stride_x, cols, mask, dim, GATED)
    act = act * tl.load(smoother_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # masked lanes stay 0
    _quantize_row(act, mask, act_scale_ptr, out_scale_ptr, q_ptr, row, stride_q, cols, PER_TOKEN)


@triton.jit
def _gemm_step(a_ptr, b_ptr, rm, rn, kk, M, N, k_end, stride_am, stride_bn, acc, EVEN_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] int32 + the int8 tiles of columns kk (masked past k_end unless EVEN_K: then the masks
    are constant along K and the loads stay 16-byte vectors)."""
    a_mask = rm[:, None] < M
    b_mask = rn[None, :] < N
    if not EVEN_K:
        a_mask = a_mask & (kk[None, :] < k_end)
        b_mask = b_mask & (kk[:, None] < k_end)
    a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + kk[None, :], mask=a_mask, other=0)  # [BLOCK_M, BLOCK_K]
    b = tl.load(b_ptr + rn[None, :].to(tl.int64) * stride_bn + kk[:, None], mask=b_mask, other=0)  # [BLOCK_K, BLOCK_N]
    return tl.dot(a, b, acc, out_dtype=tl.int32)


@triton.jit
def _scale_store(acc, rm, rn, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS: tl.constexpr):
    """The epilogue: c[rm, rn] = acc [BLOCK_M, BLOCK_N] (the whole int32 sum over K) * a_scale[m] * w_scale[n]
    (+ bias[n]), in fp32 in this order (kiln.quant.sq_math.sq_linear's), stored in c's dtype."""
    a_scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
    w_scale = tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, c_ptr, part_ptr, count_ptr, M, N, K,
                      k_per_split, stride_am, stride_bn, stride_cm, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      EVEN_K: tl.constexpr, WHILE_LOOP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), splits); M fastest, so that the M tiles of one weight tile run
    together and a prefill reads each weight byte from HBM about once. Program (m, n, s) sums its output tile over
    K slice s (k_per_split long, whole BLOCK_K steps) in int32. Without SPLIT it runs the epilogue itself; with
    SPLIT it stores its int32 partial to part [splits, M, N], and the last program of the tile to arrive sums the
    partials and runs the epilogue: integer sums are exact, so every split gives the unsplit kernel's bits.
    count_ptr: one int32 counter per output tile (0 on entry and exit)."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    kk = k_start + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    steps = tl.cdiv(k_end - k_start, BLOCK_K)
    if WHILE_LOOP:  # the interpreter (triton_common.while_loops)
        i = 0
        while i < steps:
            acc = _gemm_step(a_ptr, b_ptr, rm, rn, kk + i * BLOCK_K, M, N, k_end, stride_am, stride_bn, acc, EVEN_K)
            i += 1
    else:
        for i in range(0, steps):
            acc = _gemm_step(a_ptr, b_ptr, rm, rn, kk + i * BLOCK_K, M, N, k_end, stride_am, stride_bn, acc, EVEN_K)
    if SPLIT:
        splits = tl.num_programs(2)
        part_offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(part_ptr + pid_s.to(tl.int64) * M * N + part_offs, acc, mask=mask)
        count = count_ptr + pid_m * tl.num_programs(1) + pid_n
        if last_split_to_arrive(count, splits):
            acc = sum_splits(part_ptr, part_offs, M * N, mask, splits, WHILE_LOOP)
            _scale_store(acc, rm, rn, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")
    else:
        _scale_store(acc, rm, rn, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)


def add_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float, rms: bool, act_scale: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [tokens, dim] -> (q [tokens, dim] int8, scale [tokens, 1] float32, summed [tokens, dim]);
    act_scale [1] static, None per token."""
    tokens, dim = x.shape
    q = torch.empty(tokens, dim, dtype=torch.int8, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    summed = x if residual is None else torch.empty_like(x)
    if tokens == 0:
        return q, scale, summed
    block, warps = row_block(dim)
    res = residual if residual is not None else x
    _add_norm_quant_kernel[(tokens,)](
        x, res, weight, bias if bias is not None else weight, summed, q, act_scale if act_scale is not None else scale,
        scale, dim, x.stride(0), res.stride(0), summed.stride(0), q.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, RMS=rms, PER_TOKEN=act_scale is None,
        BLOCK=block, num_warps=warps)
    return q, scale, summed


def smooth_quant(x: torch.Tensor, smoother: torch.Tensor | None,
                 act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, dim] (times smoother [dim]) -> q [tokens, dim] int8 and scale [tokens, 1] float32, as
    kiln.quant.smoothquant.quantize_activation."""
    x = x.contiguous()
    tokens, dim = x.shape
    q = torch.empty(tokens, dim, dtype=torch.int8, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return q, scale
    block, warps = row_block(dim)
    _smooth_quant_kernel[(tokens,)](
        x, smoother if smoother is not None else x, q, act_scale if act_scale is not None else scale, scale,
        dim, x.stride(0), q.stride(0), HAS_SMOOTHER=smoother is not None, PER_TOKEN=act_scale is None,
        BLOCK=block, num_warps=warps)
    return q, scale


def act_quant(x: torch.Tensor, gated: bool, smoother: torch.Tensor,
              act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP activation (x [tokens, 2 * inter] -> silu(gate) * up, or x [tokens, inter] -> gelu(x)) times the
    smoother [inter], quantized: q [tokens, inter] int8 and scale [tokens, 1] float32."""
    x = x.contiguous()
    tokens, dim = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    q = torch.empty(tokens, dim, dtype=torch.int8, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return q, scale
    block, warps = row_block(dim)
    _act_quant_kernel[(tokens,)](x, smoother, q, act_scale if act_scale is not None else scale, scale, dim,
                                 x.stride(0), q.stride(0), GATED=gated, PER_TOKEN=act_scale is None, BLOCK=block,
                                 num_warps=warps)
    return q, scale


def _k_slices(k: int, config: Int8GemmConfig) -> tuple[int, int]:
    """(splits, k_per_split): config.split_k slices of whole BLOCK_K steps, fewer where K has fewer steps; no empty
    slice."""
    steps = max(1, cdiv(k, config.block_k))  # K = 0: one program per tile stores the bias
    per_split = cdiv(steps, max(1, min(config.split_k, steps))) * config.block_k
    return max(1, cdiv(k, per_split)), per_split


def int8_gemm(qx: torch.Tensor, a_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype,
              config: Int8GemmConfig | None = None) -> torch.Tensor:
    """qx [M, K] int8, a_scale [M, 1] float32, qw [N, K] int8, w_scale [N], bias [N] -> [M, N] `out_dtype`, with
    `config` or default_int8_config's for this shape; every config gives the same bits.

    Split-K slices sum in int32 partials [splits, M, N], added up by the last program of each output tile (counters
    of triton_common.split_counters): no second launch, nothing for the host to wait on, so it captures in a CUDA
    graph. Where no counters can be had (first use inside a capture; bind_smoothquant allocates them before) the
    launch runs unsplit: slower, the same bits."""
    m, k = qx.shape
    n = qw.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    if m == 0 or n == 0:
        return out
    if config is None:
        config = default_int8_config(m, n, k, multiprocessor_count(qx.device))
    splits, per_split = _k_slices(k, config)
    grid = (cdiv(m, config.block_m), cdiv(n, config.block_n), splits)
    counters = split_counters(qx.device) if splits > 1 else None
    if counters is None or grid[0] * grid[1] > counters.numel():
        splits, per_split = 1, k
        grid = (grid[0], grid[1], 1)
    part = out  # never read without SPLIT
    if splits > 1:
        part = torch.empty(splits, m, n, dtype=torch.int32, device=qx.device)
        if part.numel() >= 2**31:  # the kernel's offsets into part are int32 along splits
            raise ValueError(f"split_k {splits} at M={m}, N={n}: too many int32 partials; use a smaller split_k")
    _int8_gemm_kernel[grid](
        qx, qw, a_scale, w_scale, bias if bias is not None else w_scale, out, part,
        counters if splits > 1 else part, m, n, k, per_split, qx.stride(0), qw.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, SPLIT=splits > 1, EVEN_K=k % config.block_k == 0,
        WHILE_LOOP=while_loops(qx.device), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


# ------------------------------------------------------------------------------------------ binding to a model

class TritonSmoothQuantMatmul:
    """A W8A8 layer on the Triton kernels: its input quantized by the norm before it (QKV, the first MLP projection)
    or here by smooth_quant (o_proj, down_proj: the smoother rides in that pass), then the INT8 GEMM."""

    def __init__(self, w_scale: torch.Tensor, act_scale: torch.Tensor | None, smoother: torch.Tensor | None) -> None:
        self.w_scale, self.act_scale, self.smoother = w_scale, act_scale, smoother

    def __call__(self, x: torch.Tensor | QuantizedActivation, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        if isinstance(x, QuantizedActivation):
            q, scale, dtype = x
        else:
            (q, scale), dtype = smooth_quant(x, self.smoother, self.act_scale), x.dtype
        return int8_gemm(q, scale, weight, self.w_scale, bias, dtype)


def bind_smoothquant(model: nn.Module) -> int:
    """Give every W8A8 linear layer of `model` the Triton matmul, and the norms before QKV and a dense MLP the
    quantizing add + norm. Returns how many layers were bound."""
    bound = 0
    for module in model.modules():
        matmul = getattr(module, "matmul", None)
        if isinstance(module, LinearBase) and isinstance(matmul, SmoothQuantMatmul):
            module.matmul = TritonSmoothQuantMatmul(matmul.w_scale, matmul.act_scale, matmul.smoother)
            split_counters(module.weight.device)  # now, not first inside a CUDA graph capture (int8_gemm's split-K)
            bound += 1
    for block in getattr(model, "layers", {}).values():
        for norm_name, layer in normed_layers(block):
            if isinstance(layer.matmul, TritonSmoothQuantMatmul):
                norm = QuantizingNorm(getattr(block, norm_name), add_norm_quant, layer.matmul.act_scale)
                setattr(block, norm_name, norm)
        down = getattr(block.ffn, "down_proj", None)
        if down is not None and isinstance(down.matmul, TritonSmoothQuantMatmul):
            block.ffn.activation = QuantizingActivation(act_quant, isinstance(block.ffn, GatedMLP),
                                                        down.matmul.smoother, down.matmul.act_scale)
    return bound
