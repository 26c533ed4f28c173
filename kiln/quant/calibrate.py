"""Calibrated group-wise INT4: AWQ and GPTQ over a convert plan, block by block (kiln.quant.layerwise).

Both stream: the float model is made one block at a time, run on the calibration tokens, calibrated, and its result
written to a scratch safetensors file per block, so memory holds about one block whatever the model size. convert
then reads through `CalibratedSource`:
- AWQ changes float tensors only (norms, the producers of scaled inputs, scaled and clipped weights): `full_tensor`
  returns them, and convert rounds them to nearest as for plain group-wise INT4;
- GPTQ chooses the quantized values themselves: `quantized_weight(name)` returns (q, scale, zero) and convert stores
  those. The next block's inputs come from the block running its GPTQ weights (AutoGPTQ's order); AWQ's from the
  float block, whose outputs folding does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from kiln.config import ModelConfig
from kiln.layers.moe import MoE
from kiln.models.decoder import DecoderBlock
from kiln.quant.awq_fold import AwqFolder
from kiln.quant.capture import BlockCapture
from kiln.quant.gptq import gptq_quantize
from kiln.quant.group_wise import GroupWiseMethod
from kiln.quant.layerwise import FullTensors, LayerwiseModel
from kiln.quant.lm_head import HEAD, gptq_lm_head


@dataclass(frozen=True)
class CalibrationOptions:
    """How AWQ/GPTQ calibrate: `sequences` windows of `length` tokens; AWQ searches on `sample_tokens` of them."""

    algo: str  # "awq" or "gptq"
    sequences: int = 128
    length: int = 512
    seed: int = 1234
    desc_act: bool = False  # GPTQ act-order
    damp: float = 0.01  # GPTQ damping, a fraction of the mean diagonal of H
    sample_tokens: int = 2048  # AWQ's search sample per weight
    grid: int = 20  # AWQ's alpha grid and clipping grid
    awq_clip: bool = True  # AWQ's clipping search after the scales


class CalibratedSource:
    """The convert plan's weight source with calibration's results in front of it (see the module docstring)."""

    def __init__(self, base: FullTensors, floats: dict[str, Path], quantized: dict[str, Path]) -> None:
        self.base, self.floats, self.quantized = base, floats, quantized

    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in self.floats:
            with safe_open(str(self.floats[name]), framework="pt") as f:
                return f.get_tensor(name)
        return self.base.full_tensor(name, shape)

    def quantized_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if name not in self.quantized:
            return None
        with safe_open(str(self.quantized[name]), framework="pt") as f:
            return tuple(f.get_tensor(f"{name}{s}") for s in ("", "_scale", "_zero"))  # type: ignore[return-value]


def calibrate(config: ModelConfig, source: FullTensors, method: GroupWiseMethod, tokens: torch.Tensor,
              options: CalibrationOptions, workdir: Path, progress: bool = True,
              lm_head: bool = False) -> CalibratedSource:
    """Calibrate every block of the model on `tokens` [sequences, length]; results go to files under `workdir`.
    With `lm_head` (--quantize_lm_head) GPTQ calibrates the LM head too; AWQ leaves it to round to nearest
    (kiln.quant.lm_head says why)."""
    model = LayerwiseModel(config, source, tokens)
    acts = model.embed()
    floats: dict[str, Path] = {}
    quantized: dict[str, Path] = {}
    for i in tqdm(range(config.num_hidden_layers), desc=f"calibrate ({options.algo})", unit="block",
                  disable=not progress):
        block, prefix, path = model.block(i), f"layers.{i}.", workdir / f"block{i}.safetensors"
        if options.algo == "awq":
            acts = _awq_block(model, block, acts, method, options, config)
            tensors = {prefix + n: p.detach().to(config.torch_dtype).contiguous() for n, p in block.named_parameters()}
            floats.update({name: path for name in tensors})
        else:
            acts, results = _gptq_block(model, block, acts, method, options, config)
            tensors = {}
            for name, (q, scale, zero) in results.items():
                tensors.update({prefix + name: q, f"{prefix}{name}_scale": scale, f"{prefix}{name}_zero": zero})
                quantized[prefix + name] = path
        save_file(tensors, str(path))
        del block
    if lm_head and options.algo == "gptq":
        path = workdir / "lm_head.safetensors"
        q, scale, zero = gptq_lm_head(model, acts, method, options.damp, options.desc_act, config.torch_dtype)
        save_file({HEAD: q, HEAD + "_scale": scale, HEAD + "_zero": zero}, str(path))
        quantized[HEAD] = path
    return CalibratedSource(source, floats, quantized)


# ------------------------------------------------------------------------------------------------------------ GPTQ

def _gptq_block(model: LayerwiseModel, block: DecoderBlock, acts: Any, method: GroupWiseMethod,
                options: CalibrationOptions, config: ModelConfig) -> tuple[Any, dict[str, tuple]]:
    capture = BlockCapture(block, 0, hessian=True)
    model.run(block, acts)
    capture.remove()
    results: dict[str, tuple] = {}
    params = dict(block.named_parameters())
    for name, stats in capture.stats.items():
        if name.startswith(("ffn.w13.", "ffn.w2.")):
            continue
        results[name] = _gptq_weight(params[name], stats.hessian_matrix(params[name].shape[1]), method, options,
                                     config)
    moe = block.ffn if isinstance(block.ffn, MoE) else None
    if moe is not None:
        for kind in ("w13", "w2"):
            weight = getattr(moe, kind)
            parts = [_gptq_weight(weight[e], capture.stat(f"ffn.{kind}.{e}").hessian_matrix(weight.shape[2]), method,
                                  options, config) for e in range(weight.shape[0])]
            results[f"ffn.{kind}"] = tuple(torch.stack(p) for p in zip(*parts))
    return model.run(block, acts), results


def _gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, method: GroupWiseMethod, options: CalibrationOptions,
                 config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ one weight [out, in], then put its dequantized values in the block (the next run uses them)."""
    q, scale, zero = gptq_quantize(weight.detach(), hessian, method.group_size, method.bits, config.torch_dtype,
                                   options.damp, options.desc_act)
    g = torch.arange(weight.shape[-1]) // method.group_size
    with torch.no_grad():
        weight.copy_((q.float() - zero.float()[:, g]) * scale.float()[:, g])
    return q, scale, zero


# ------------------------------------------------------------------------------------------------------------- AWQ

def _awq_block(model: LayerwiseModel, block: DecoderBlock, acts: Any, method: GroupWiseMethod,
               options: CalibrationOptions, config: ModelConfig) -> Any:
    whole_windows = max(1, options.sample_tokens // model.length) * model.length  # the attention runs on windows
    capture = BlockCapture(block, whole_windows, hessian=False)
    out = model.run(block, acts)
    capture.remove()
    AwqFolder(capture, method, options.grid, options.awq_clip, model.attention).fold_block(block)
    return out
