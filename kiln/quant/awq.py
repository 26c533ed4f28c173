"""AWQ (Lin et al. 2023, as AutoAWQ implements it): activation-aware scaling and clipping before round to nearest.

Scale search: for the linears that read one input (QKV after the input norm; the MLP's first linears, or the MoE's
router and every expert's w13, after the second norm; the output projection after V; the down projection after the
up projection), per input channel `s = mean|x|^alpha / sqrt(max * min)` over a grid of alpha in [0, 1); the alpha
whose `Q(W * s) / s` gives the smallest squared error on a sample of calibration windows wins: the error of the
module's output, as AutoAWQ measures it (the attention's output for QKV, the MLP's for its first linears, each
expert's for its w13), or of the linear's own (the output and down projections, w2). With alpha 0 (s = 1, plain
round to nearest) among the candidates, the chosen scales never do worse on the sample.

Folding: `W[:, c] *= s[c]` for the linears, and the producer of their input divided by s: a norm's weight (and
bias), the V rows of QKV, the up rows of a gated MLP or of each expert's w13. The float model's outputs are unchanged
(up to rounding); only what the 4-bit grid sees changes. MPT's GELU MLP has no such producer for its down projection
(`gelu(x) / s` is not `gelu(x / s)`): it is left unscaled (AutoAWQ adds a scaled activation layer instead; kiln keeps
the engine's layers as they are). V -> output projection is scaled only when every head has its own V (no GQA) and
QKV is not clipped (DBRX's clip_qkv would clip V / s differently).

Clipping: each weight (except the fused QKV, whose Q and K errors reach the attention scores, as AutoAWQ skips them)
is then clamped per output row and group to `+-r * max|w|`, r from 1 down to 0.5, choosing the r with the smallest
squared error of that group's partial outputs on the sample.
"""

from __future__ import annotations

from typing import Callable

import torch

from kiln.quant.group_wise import quantize_groups


def fake_quant(w: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """w [out, in] -> its group-wise round-to-nearest values (float32)."""
    q, scale, zero = quantize_groups(w, group_size, bits, torch.float32)
    g = torch.arange(w.shape[-1]) // group_size
    return (q.float() - zero[:, g]) * scale[:, g]


def output_error(pairs: list[tuple[torch.Tensor, torch.Tensor]], scale: torch.Tensor, group_size: int,
                 bits: int) -> float:
    """Summed squared error of `x @ (Q(W * s) / s).T` against `x @ W.T` over (W [out, in], x [t, in]) pairs."""
    total = 0.0
    for w, x in pairs:
        approx = fake_quant(w * scale, group_size, bits) / scale
        total += float(((x @ (approx - w).T) ** 2).sum())
    return total


def search_scale(pairs: list[tuple[torch.Tensor, torch.Tensor]], x_mean: torch.Tensor, group_size: int, bits: int,
                 grid: int = 20, inspect: Callable[[list[torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
    """The per-input-channel scale [in] that minimises the error over alpha in {0, 1/grid, ...}: of the linears' own
    outputs (output_error), or, with `inspect` (the weights -> the output of the module that holds them, on the
    sample), of that module's output with the pairs' weights replaced by `Q(W * s) / s`."""
    pairs = [(w.float(), x.float()) for w, x in pairs if x.shape[0]]
    if not pairs:
        return torch.ones_like(x_mean)
    if inspect is None:
        def error(s: torch.Tensor) -> float:
            return output_error(pairs, s, group_size, bits)
    else:
        reference = inspect([w for w, _ in pairs])

        def error(s: torch.Tensor) -> float:
            approx = inspect([fake_quant(w * s, group_size, bits) / s for w, _ in pairs])
            return float(((approx - reference) ** 2).sum())
    best, best_scale = float("inf"), torch.ones_like(x_mean)
    for step in range(grid):
        s = x_mean.float().pow(step / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = error(s)
        if err < best:
            best, best_scale = err, s
    return best_scale


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, bits: int, grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """w [out, in] clamped per (row, group) to the range that minimises the group's partial-output error on
    x [t, in]; w itself when x is empty."""
    if not x.shape[0]:
        return w
    out_f, in_f = w.shape
    groups = -(-in_f // group_size)
    pad = groups * group_size - in_f
    wp = torch.nn.functional.pad(w.float(), (0, pad)).view(out_f, groups, group_size)
    xp = torch.nn.functional.pad(x.float(), (0, pad)).view(-1, groups, group_size)
    reference = torch.einsum("tgk,ogk->ogt", xp, wp)  # [out, groups, t]
    max_abs = wp.abs().amax(-1, keepdim=True)  # [out, groups, 1]
    best_err = torch.full((out_f, groups), float("inf"))
    best_max = max_abs.clone()
    for step in range(int(grid * (1 - max_shrink))):
        limit = max_abs * (1 - step / grid)
        clipped = torch.maximum(torch.minimum(wp, limit), -limit).view(out_f, -1)[:, :in_f]
        approx = torch.nn.functional.pad(fake_quant(clipped, group_size, bits), (0, pad)).view(out_f, groups, -1)
        err = ((torch.einsum("tgk,ogk->ogt", xp, approx) - reference) ** 2).mean(-1)  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), limit, best_max)
    clipped = torch.maximum(torch.minimum(wp, best_max), -best_max).view(out_f, -1)[:, :in_f]
    return clipped.to(w.dtype)
