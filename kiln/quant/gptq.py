"""GPTQ (Frantar et al. 2022, as AutoGPTQ implements it): quantize a linear layer's weight column by column, each
column's rounding error spread over the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error, `H = 2 X^T X / n` over the calibration inputs X [n, in].

- Damping: `H += damp * mean(diag(H)) * I` (damp 0.01 by default); inputs never seen (diag 0) get diag 1. Unlike
  AutoGPTQ, their weights are kept, not zeroed: an expert that no calibration token chose still runs at inference.
- `U = cholesky(H^-1)^T` (upper): column i's error `(w_i - q_i) / U[i, i]` updates columns j > i by `U[i, j]`.
- Groups: a group's scale and zero point (kiln.quant.group_wise's asymmetric recipe) are chosen when its first column
  is reached, from the group's columns as the earlier errors left them. Columns are processed in blocks of one group.
- Act-order (`desc_act`): columns are processed by decreasing diag(H). To keep the stored groups contiguous (no g_idx
  at run time), the group parameters are then fixed up front from the original weights ("static groups" in
  AutoGPTQ), and each column uses its own group's, whatever order it is reached in.
"""

from __future__ import annotations

import torch

from kiln.quant.group_wise import group_params, quantize_values


def hessian_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H [in, in] (float64) -> the upper Cholesky factor of its damped inverse. Retries with 10x the damping when
    H is not positive definite in floating point."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h + damp * 10**attempt * mean_diag * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("GPTQ: the calibration Hessian stays singular after damping; use more calibration tokens")


def _static_groups(w: torch.Tensor, group_size: int, bits: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    groups = -(-w.shape[1] // group_size)
    lo = torch.stack([w[:, g * group_size:(g + 1) * group_size].amin(1) for g in range(groups)], 1)
    hi = torch.stack([w[:, g * group_size:(g + 1) * group_size].amax(1) for g in range(groups)], 1)
    return group_params(lo, hi, bits, dtype)  # [out, groups] each


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, bits: int, dtype: torch.dtype,
                  damp: float = 0.01, desc_act: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in], hessian [in, in] -> q [out, in] int16 (0..2^bits-1), scale and zero [out, ceil(in / G)] in
    `dtype`, in the weight's own column order."""
    w = weight.double().clone()
    out_features, in_features = w.shape
    groups = -(-in_features // group_size)
    order = torch.argsort(torch.diagonal(hessian), descending=True) if desc_act else torch.arange(in_features)
    scale = torch.zeros(out_features, groups, dtype=dtype)
    zero = torch.zeros_like(scale)
    if desc_act:
        scale, zero = _static_groups(weight.float(), group_size, bits, dtype)
    u = hessian_inverse_factor(hessian.double()[order][:, order], damp)
    w = w[:, order]
    q = torch.zeros(out_features, in_features, dtype=torch.int16)
    for start in range(0, in_features, group_size):
        stop = min(start + group_size, in_features)
        block, errors = w[:, start:stop].clone(), torch.zeros(out_features, stop - start, dtype=w.dtype)
        if not desc_act:  # the group is this block: its parameters from its columns as they stand now
            g = start // group_size
            scale[:, g], zero[:, g] = group_params(block.amin(1), block.amax(1), bits, dtype)
        for i in range(stop - start):
            g = int(order[start + i]) // group_size
            s, z = scale[:, g].double(), zero[:, g].double()
            qi = quantize_values(block[:, i], s, z, bits)
            q[:, start + i] = qi
            error = (block[:, i] - (qi.double() - z) * s) / u[start + i, start + i]
            block[:, i:] -= error.unsqueeze(1) * u[start + i, start + i:stop].unsqueeze(0)
            errors[:, i] = error
        w[:, stop:] -= errors @ u[start:stop, stop:]
    inverse = torch.argsort(order)
    return q[:, inverse], scale, zero
