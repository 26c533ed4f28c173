"""GPTQ act-order (desc_act) layers on the group-wise kernels: the stored input order made group-contiguous, once.

A published act-order layer keeps `g_idx` [in_local] (each input's group, kiln.quant.published_group_wise), so its
inputs of one group are scattered along the input dim, while the Triton weight-only kernels read one scale and zero
per tile of consecutive inputs (`g(k) = (k + k_offset) // G`). As exllama and vLLM do, the layer is reordered when
the kernels are bound: `perm` = the inputs sorted by group (stable), the weight's input dim permuted by it (values
unpacked, reordered, repacked), the scale and zero columns picked in the new group order; at run time the layer
multiplies `x[:, perm]` (one index_select, no host sync: graph-safe). Since
`sum_k x[k] w[o, k] = sum_k' x[perm[k']] w[o, perm[k']]`, the result is the original layer's.

The kernels need every group but the first and the last of the new order to hold exactly G inputs. GPTQ act-order
gives that on a whole input dim (input `order[i]` is in group i // G, so every group holds G inputs but a short last
one). A rank's slice of a row-parallel layer at tp > 1 holds a scattered subset of every group: it is refused by name
(`ActOrderError`) and that layer keeps the torch path (dequantize with g_idx, then matmul), as vLLM's exllama path
does for such layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.quant.apply import GroupWiseMatmul
from kiln.quant.group_wise import pack_values, unpack_values

# Rows of a weight unpacked at a time while reordering: bounds the int16 working copy (~8 MB for 4096 inputs).
_ROWS_PER_PASS = 1024


class ActOrderError(ValueError):
    """An act-order layer whose inputs do not form whole groups: the kernels cannot read it exactly."""


@dataclass(frozen=True)
class ActOrderLayout:
    """How one act-order layer is reordered for the kernels."""

    perm: torch.Tensor  # [in_local] int64: input k' of the reordered layer is stored input perm[k']
    groups: torch.Tensor  # [new groups] int64: the scale/zero column of each contiguous group, in the new order
    k_offset: int  # where the first contiguous group starts inside a G-wide tile (it holds G - k_offset inputs)


def _group_order(counts: torch.Tensor, group_size: int, bits: int) -> tuple[list[int], int]:
    """The groups present (count > 0) in the order the kernels can read: whole ones (G inputs) in index order, at
    most one short group first (its tile starts k_offset = G - count in) and one short group last."""
    present = torch.nonzero(counts).flatten().tolist()
    over = [g for g in present if int(counts[g]) > group_size]
    if over:
        raise ActOrderError(f"group {over[0]} holds {int(counts[over[0]])} inputs, more than the group size "
                            f"{group_size} (a damaged g_idx)")
    short = [g for g in present if int(counts[g]) != group_size]
    whole = [g for g in present if int(counts[g]) == group_size]
    if len(short) > 2:
        sizes = sorted({int(counts[g]) for g in short})
        raise ActOrderError(f"its inputs fall in {len(short)} partial groups (of {', '.join(map(str, sizes[:4]))}"
                            f"{'...' if len(sizes) > 4 else ''} inputs), not whole groups of {group_size}")
    if len(short) == 2:
        # 4 bits: the first tile starts k_offset = G - count inputs in, on a whole byte, so that count must be even
        # (the two counts sum to an even in_local minus whole groups: both even or both odd).
        first = next((g for g in short if bits != 4 or int(counts[g]) % 2 == 0), None)
        if first is None:
            raise ActOrderError("its two partial groups hold odd counts of inputs, which 4-bit bytes cannot start at")
        last = short[1] if first == short[0] else short[0]
        return [first, *whole, last], group_size - int(counts[first])
    return whole + short, 0


def act_order_layout(g_idx: torch.Tensor, group_size: int, bits: int) -> ActOrderLayout:
    """The reordering of a layer with act-order group indices `g_idx` [in_local]; ActOrderError (saying why) when
    its inputs do not form whole groups of `group_size`."""
    g = g_idx.detach().to("cpu", torch.int64)
    if g.dim() != 1 or g.numel() == 0 or int(g.min()) < 0:
        raise ActOrderError(f"g_idx must be a non-empty 1-D tensor of group indices >= 0, got {tuple(g.shape)}")
    counts = torch.bincount(g)
    order, k_offset = _group_order(counts, group_size, bits)
    rank = torch.empty(counts.numel(), dtype=torch.int64)
    rank[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    perm = torch.sort(rank[g], stable=True).indices  # inputs by new group position, stored order within a group
    return ActOrderLayout(perm, torch.tensor(order, dtype=torch.int64), k_offset)


def reorder_inputs(stored: torch.Tensor, perm: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored weight [out, in (/2)] int8 -> the same values with inputs in `perm`'s order (column k' holds input
    perm[k']), repacked: [out, in (/2)] int8. Unpacked a block of rows at a time."""
    out = torch.empty_like(stored)
    perm = perm.to(stored.device)
    for start in range(0, stored.shape[0], _ROWS_PER_PASS):
        rows = slice(start, start + _ROWS_PER_PASS)
        out[rows] = pack_values(unpack_values(stored[rows], bits).index_select(-1, perm), bits)
    return out


class ActOrderMatmul:
    """An act-order layer after reordering (still the torch path): x's inputs gathered by `perm`, then `reordered`,
    the group-wise matmul of the reordered weight (g_idx None), whose format attributes the kernel binding reads."""

    def __init__(self, perm: torch.Tensor, reordered: GroupWiseMatmul) -> None:
        self.perm, self.reordered = perm, reordered

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        return self.reordered(x.index_select(-1, self.perm), weight, bias)


def reorder_layer(module: torch.nn.Module) -> ActOrderMatmul | GroupWiseMatmul:
    """Reorder one act-order layer in place (its `weight` permuted along the inputs) and return its new matmul:
    without a gather when the group order needs no permutation. ActOrderError leaves the layer untouched."""
    matmul: GroupWiseMatmul = module.matmul
    layout = act_order_layout(matmul.g_idx, matmul.group_size, matmul.bits)
    scale, zero = matmul.scale, matmul.zero  # [out, groups]: every group column on every rank
    if not torch.equal(layout.groups, torch.arange(scale.shape[-1])):
        groups = layout.groups.to(scale.device)
        scale, zero = scale.index_select(-1, groups), zero.index_select(-1, groups)
    reordered = GroupWiseMatmul(matmul.method, scale, zero, layout.k_offset)
    if torch.equal(layout.perm, torch.arange(layout.perm.numel())):
        return reordered
    module.weight.data.copy_(reorder_inputs(module.weight.data, layout.perm, matmul.bits))
    return ActOrderMatmul(layout.perm.to(module.weight.device), reordered)


def reorder_act_order_layers(model: torch.nn.Module) -> tuple[int, list[str]]:
    """Reorder every act-order layer of `model` the kernels can read (`reorder_layer`). Returns how many were
    reordered and, for each one left on its torch path, one line naming it and saying why."""
    done, refused = 0, []
    for where, module in model.named_modules():
        matmul = getattr(module, "matmul", None)
        if not isinstance(matmul, GroupWiseMatmul) or matmul.g_idx is None:
            continue
        try:
            module.matmul = reorder_layer(module)
            done += 1
        except ActOrderError as err:
            refused.append(f"{where}: {err}")
    return done, refused
