"""GPTQ act-order (desc_act) layers on the group-wise kernels: the stored input order made group-contiguous, once.

A published act-order layer keeps `g_idx` [in_local] (each input's group, kiln.quant.published_group_wise), so its
inputs of one group are scattered along the input dim, while the Triton weight-only kernels read one scale and zero
per tile of consecutive inputs (`g(k) = (k + k_offset) // G`). As exllama and vLLM do, the layer is reordered when
the kernels are bound: `perm` = the inputs sorted by group (stable), the weight's input dim permuted by it (values
unpacked, reordered, repacked), the scale and zero columns picked in the new group order; at run time the layer
multiplies `x[:, perm]` (one index_select, no host sync: graph-safe). Since
`sum_k x[k] w[o, k] = sum_k' x[perm[k']] w[o, perm[k']]`, the result is the original layer's.

Two layouts:
- whole groups (`group_size` G): every group of the new order but the first and the last holds exactly G inputs.
  GPTQ act-order gives that on a whole input dim (input `order[i]` is in group i // G: G inputs each but a short
  last group), so at tp 1 and in column-parallel layers the layer keeps its size;
- padded tiles (`group_size` 32): a rank's slice of a row-parallel layer at tp > 1 holds a scattered part of every
  group (about G / tp inputs each). Each group's inputs are then padded up to a multiple of 32 (the kernels' smallest
  group) and every 32-wide tile gets its group's scale and zero column. Pad columns read a zero appended to x, so
  they add exactly 0. The weight grows by the padding (about 16 inputs a group), the scales to one column per tile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kiln.quant.apply import GroupWiseMatmul
from kiln.quant.group_wise import pack_values, unpack_values

# Rows of a weight unpacked at a time while reordering: bounds the int16 working copy (~8 MB for 4096 inputs).
_ROWS_PER_PASS = 1024
# The padded layout's tile: the smallest group size the kernels read (their smallest K tile).
TILE = 32


class ActOrderError(ValueError):
    """An act-order layer whose inputs do not form whole groups (it is then padded to tiles)."""


@dataclass(frozen=True)
class ActOrderLayout:
    """How one act-order layer is reordered for the kernels."""

    perm: torch.Tensor  # [width] int64: column k' of the new layer is stored input perm[k']; in_local: a zero pad
    groups: torch.Tensor  # [width groups] int64: the scale/zero column of each group of the new layer
    group_size: int  # the new layer's group size: the layer's G, or TILE when padded
    k_offset: int  # where the new layer's first group starts inside a group_size-wide tile
    in_local: int  # the stored layer's inputs

    @property
    def padded(self) -> bool:
        return self.perm.numel() != self.in_local


def _group_order(counts: torch.Tensor, group_size: int, bits: int) -> tuple[list[int], int]:
    """The groups present (count > 0) in the order the kernels can read as whole groups: whole ones (G inputs) in
    index order, at most one short group first (its tile starts k_offset = G - count in) and one short group last."""
    present = torch.nonzero(counts).flatten().tolist()
    short = [g for g in present if int(counts[g]) != group_size]
    whole = [g for g in present if int(counts[g]) == group_size]
    if any(int(counts[g]) > group_size for g in short):
        raise ActOrderError(f"a group holds more than {group_size} inputs")
    if len(short) > 2:
        raise ActOrderError(f"its inputs fall in {len(short)} partial groups, not whole groups of {group_size}")
    if len(short) == 2:
        # 4 bits: the first tile starts k_offset = G - count inputs in, on a whole byte, so that count must be even
        # (the two counts sum to an even in_local minus whole groups: both even or both odd).
        first = next((g for g in short if bits != 4 or int(counts[g]) % 2 == 0), None)
        if first is None:
            raise ActOrderError("its two partial groups hold odd counts of inputs, which 4-bit bytes cannot start at")
        last = short[1] if first == short[0] else short[0]
        return [first, *whole, last], group_size - int(counts[first])
    return whole + short, 0


def _padded_layout(g: torch.Tensor, counts: torch.Tensor) -> ActOrderLayout:
    """Each present group's inputs (stored order) padded with zero columns to a multiple of TILE."""
    in_local, by_group = g.numel(), torch.sort(g, stable=True).indices
    perm, groups, start = [], [], 0
    for group in torch.nonzero(counts).flatten().tolist():
        count = int(counts[group])
        tiles = -(-count // TILE)
        perm += [by_group[start:start + count], torch.full((tiles * TILE - count,), in_local, dtype=torch.int64)]
        groups += [group] * tiles
        start += count
    return ActOrderLayout(torch.cat(perm), torch.tensor(groups, dtype=torch.int64), TILE, 0, in_local)


def act_order_layout(g_idx: torch.Tensor, group_size: int, bits: int) -> ActOrderLayout:
    """The reordering of a layer with act-order group indices `g_idx` [in_local]: whole groups where its inputs form
    them, else padded tiles."""
    g = g_idx.detach().to("cpu", torch.int64)
    if g.dim() != 1 or g.numel() == 0 or int(g.min()) < 0:
        raise ValueError(f"g_idx must be a non-empty 1-D tensor of group indices >= 0, got {tuple(g.shape)}")
    counts = torch.bincount(g)
    try:
        order, k_offset = _group_order(counts, group_size, bits)
    except ActOrderError:
        return _padded_layout(g, counts)
    rank = torch.empty(counts.numel(), dtype=torch.int64)
    rank[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    perm = torch.sort(rank[g], stable=True).indices  # inputs by new group position, stored order within a group
    return ActOrderLayout(perm, torch.tensor(order, dtype=torch.int64), group_size, k_offset, g.numel())


def reorder_inputs(stored: torch.Tensor, perm: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored weight [out, in (/2)] int8 -> its values with column k' holding input perm[k'] (perm[k'] = in: a zero
    value, for pads), repacked: [out, len(perm) (/2)] int8. Unpacked a block of rows at a time."""
    width = perm.numel() // 2 if bits == 4 else perm.numel()
    out = torch.empty(stored.shape[0], width, dtype=torch.int8, device=stored.device)
    perm = perm.to(stored.device)
    for start in range(0, stored.shape[0], _ROWS_PER_PASS):
        rows = slice(start, start + _ROWS_PER_PASS)
        values = F.pad(unpack_values(stored[rows], bits), (0, 1))  # [rows, in + 1]: the pad column
        out[rows] = pack_values(values.index_select(-1, perm), bits)
    return out


def gather_inputs(x: torch.Tensor, perm: torch.Tensor, padded: bool) -> torch.Tensor:
    """x [..., in] -> [..., len(perm)]: x's inputs in the reordered layer's order; pads (index in) read a zero."""
    return (F.pad(x, (0, 1)) if padded else x).index_select(-1, perm)


class ActOrderMatmul:
    """An act-order layer after reordering (still the torch path): x's inputs gathered by `perm`, then `reordered`,
    the group-wise matmul of the reordered weight (g_idx None), whose format attributes the kernel binding reads."""

    def __init__(self, perm: torch.Tensor, padded: bool, reordered: GroupWiseMatmul) -> None:
        self.perm, self.padded, self.reordered = perm, padded, reordered

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        return self.reordered(gather_inputs(x, self.perm, self.padded), weight, bias)


def reorder_layer(module: torch.nn.Module) -> ActOrderMatmul | GroupWiseMatmul:
    """Reorder one act-order layer in place (its `weight` replaced by the reordered one, wider when padded) and return
    its new matmul: without a gather when the group order needs no permutation."""
    matmul: GroupWiseMatmul = module.matmul
    layout = act_order_layout(matmul.g_idx, matmul.group_size, matmul.bits)
    scale, zero = matmul.scale, matmul.zero  # [out, groups]: every group column on every rank
    if not torch.equal(layout.groups, torch.arange(scale.shape[-1])):
        groups = layout.groups.to(scale.device)
        scale, zero = scale.index_select(-1, groups), zero.index_select(-1, groups)
    method = replace(matmul.method, group_size=layout.group_size)
    reordered = GroupWiseMatmul(method, scale, zero, layout.k_offset)
    if torch.equal(layout.perm, torch.arange(layout.in_local)):
        return reordered
    module.weight.data = reorder_inputs(module.weight.data, layout.perm, matmul.bits)
    return ActOrderMatmul(layout.perm.to(module.weight.device), layout.padded, reordered)


def reorder_act_order_layers(model: torch.nn.Module) -> tuple[int, list[str]]:
    """Reorder every act-order layer of `model` (`reorder_layer`). Returns how many were reordered and the names of
    those that were padded (a row-parallel rank's scattered groups), with the bytes their weights grew by."""
    done, padded = 0, []
    for where, module in model.named_modules():
        matmul = getattr(module, "matmul", None)
        if not isinstance(matmul, GroupWiseMatmul) or matmul.g_idx is None:
            continue
        before = module.weight.numel()
        module.matmul = reorder_layer(module)
        done += 1
        if getattr(module.matmul, "padded", False):
            padded.append(f"{where} (+{(module.weight.numel() - before) / 2**20:.1f} MiB)")
    return done, padded
