"""What calibration records of a block's linear inputs while the block runs: per input channel mean |x| and a sample
of rows (AWQ), and the GPTQ Hessian sum `2 X^T X`. The MoE's experts are recorded per expert, from the tokens the
router sends each (w13 reads those tokens, w2 their `silu(gate) * up`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kiln.layers.moe import MoE


@dataclass
class InputStats:
    """Running statistics of one weight's inputs x [tokens, in]."""

    sample_limit: int
    hessian: bool
    abs_sum: torch.Tensor | None = None  # [in] float64
    count: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0
    xtx: torch.Tensor | None = None  # [in, in] float64: sum of 2 x x^T

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(x.shape[-1], dtype=torch.float64)
        self.abs_sum += x.abs().sum(0).double()
        self.count += x.shape[0]
        if self.sampled < self.sample_limit:
            self.sample.append(x[: self.sample_limit - self.sampled])
            self.sampled += self.sample[-1].shape[0]
        if self.hessian:
            xd = x.double()
            self.xtx = (0 if self.xtx is None else self.xtx) + 2 * xd.T @ xd

    def mean_abs(self, width: int) -> torch.Tensor:  # [in]
        return torch.zeros(width) if self.abs_sum is None else (self.abs_sum / max(self.count, 1)).float()

    def rows(self, width: int) -> torch.Tensor:  # [sampled, in]
        return torch.cat(self.sample) if self.sample else torch.zeros(0, width)

    def hessian_matrix(self, width: int) -> torch.Tensor:  # [in, in]: 2 X^T X / n
        if self.xtx is None:
            return torch.zeros(width, width, dtype=torch.float64)
        return self.xtx / self.count


def expert_inputs(moe: MoE, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each local expert, (its tokens of x [n_e, hidden], their activation silu(gate) * up [n_e, ffn]) as the
    float experts compute them."""
    _, ids = moe.route(x)
    out = []
    ffn = moe.w13.shape[1] // 2
    for e in range(moe.w13.shape[0]):
        rows = (ids == e).any(-1)
        xe = x[rows]
        gate_up = xe @ moe.w13[e].float().T
        out.append((xe, F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]))
    return out


class BlockCapture:
    """Forward pre-hooks on a block's quantized linears and MoE, feeding an InputStats per weight name (relative to
    the block: `attn.qkv_proj.weight`, `ffn.w13.3` for expert 3's w13)."""

    def __init__(self, block: nn.Module, sample_limit: int, hessian: bool) -> None:
        self.stats: dict[str, InputStats] = {}
        self.moe_input = InputStats(sample_limit, False)
        self.sample_limit, self.hessian = sample_limit, hessian
        self.handles = []
        for name, module in block.named_modules():
            if isinstance(module, MoE):
                self.handles.append(module.register_forward_pre_hook(self._moe_hook(module)))
            elif name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "up_proj", "down_proj")):
                self.handles.append(module.register_forward_pre_hook(self._linear_hook(name + ".weight")))

    def stat(self, name: str) -> InputStats:
        return self.stats.setdefault(name, InputStats(self.sample_limit, self.hessian))

    def _linear_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.stat(name).add(args[0])
        return hook

    def _moe_hook(self, moe: MoE):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            self.moe_input.add(x)
            for e, (xe, act) in enumerate(expert_inputs(moe, x)):
                self.stat(f"ffn.w13.{e}").add(xe)
                self.stat(f"ffn.w2.{e}").add(act)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
