"""Loading published AutoGPTQ and AutoAWQ (GEMM) checkpoints at `kiln convert`: their description becomes kiln's
group-wise QuantConfig, and their packed tensors become kiln's unpacked values, which convert then shards and
repacks exactly as it does its own calibrated ones (kiln.checkpoint.convert's `quantized_weight` hook).

The family weight maps stay as they are: a view of the checkpoint shows each published linear `<prefix>.qweight`
(with its qzeros, scales, g_idx) as one `<prefix>.weight`, so the maps' checks of missing and unexpected tensors
hold, and a fused kiln weight (Baichuan's gate+up) concatenates its parts' values, scales and zeros along the output
rows. The rules that act on output rows (and experts) only are exact on quantized values: `identity`, `concat_rows`
and the stacking of DBRX "converted"'s per-expert Linears into kiln's fused experts (kiln.quant.published_moe has
that layout's checks); another rule (the fused DBRX layout's reshapes) is refused by name.

Act-order (`desc_act` true) checkpoints keep each layer's g_idx as `<name>_g_idx` and every group column on every
rank: exact for any permutation, column- or row-parallel, without reordering neighbouring layers; the Triton kernels
refuse g_idx, so these layers run the torch path (dequantize, then matmul).

What is not run exactly is refused in one line: 2- and 3-bit, exllama/marlin repackings, AWQ GEMV/marlin layouts,
AWQ without zero points, and a g_idx other than `k // group_size` in a checkpoint that does not say desc_act.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kiln.checkpoint.hf_reader import CheckpointError, HFCheckpoint
from kiln.checkpoint.sources import HFWeightSource
from kiln.config import ConfigError, ModelConfig, QuantConfig
from kiln.models.family import Family, find_rule, sources_for
from kiln.models.transforms import TRANSFORMS
from kiln.quant.published import describe, published_quantization
from kiln.quant.published_awq import read_awq
from kiln.quant.published_gptq import GPTQ_BITS, GPTQ_FORMATS, read_gptq

PARTS = ("qweight", "qzeros", "scales", "g_idx")
# The weight-map transforms that act on output rows (and stack experts) only: each applies to q, scale and zero alike.
EXACT_RULES = ("identity", "concat_rows", "stack_expert_pairs", "stack_experts")


@dataclass(frozen=True)
class PublishedFormat:
    """A published group-wise checkpoint's format, as kiln reads it."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # -1: one group over each row's inputs
    v1_zeros: bool  # AutoGPTQ checkpoint_format "gptq": stored zero points are zero - 1
    act_order: bool = False  # GPTQ desc_act: each layer keeps its published g_idx (torch path at run time)

    @property
    def quant_algo(self) -> str:
        return "W4A16_AWQ" if self.method == "awq" else f"W{self.bits}A16_GPTQ"

    def read(self, tensors: dict[str, torch.Tensor], where: str):
        """One linear's published tensors -> q [out, in] int16, scale and zero [out, groups] float32, g_idx."""
        if self.method == "awq":
            return read_awq(tensors, where)
        return read_gptq(tensors, self.bits, self.v1_zeros, where)

    def quant_config(self, flags: QuantConfig, config: ModelConfig) -> QuantConfig:
        """kiln's QuantConfig: this format's weights, with the KV-cache choice of the flags. group_size -1 is one group
        at least as wide as every layer's inputs (a multiple of 32, which the kernels need; a power of two for MoE)."""
        group = self.group_size
        if group == -1:
            widest = max(config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_size)
            group = -(-widest // 32) * 32
            if config.is_moe:  # the fused MoE's kernels take powers of two (kiln.quant.published_moe)
                group = 1 << (group - 1).bit_length()
        return replace(flags, quant_algo=self.quant_algo, group_size=group, has_zero_point=True,
                       act_order=self.act_order,
                       exclude_modules=["embed_tokens", "lm_head", "*router", "*norm*"])


def _refuse(model_dir: Path, q: dict[str, Any], why: str) -> ConfigError:
    return ConfigError(f"{model_dir} is a quantized checkpoint, {describe(q)}: {why}; convert the unquantized "
                       "checkpoint instead (kiln can calibrate int4_gptq/int4_awq itself)")


def published_format(model_dir: Path, hf: dict[str, Any]) -> PublishedFormat | None:
    """The checkpoint's GPTQ/AWQ format, None for an unquantized checkpoint or another method (published.py's
    refusal names those); raises one line for a GPTQ/AWQ variant kiln does not run exactly."""
    q = published_quantization(model_dir, hf)
    method = str(q.get("quant_method", "")).lower() if q is not None else ""
    if method not in ("gptq", "awq"):
        return None
    bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise _refuse(model_dir, q, f"group_size {group!r} is not a positive integer or -1")
    if method == "gptq":
        layout = q.get("checkpoint_format", "gptq")
        if bits not in GPTQ_BITS:
            raise _refuse(model_dir, q, f"kiln runs 4- and 8-bit GPTQ, not {bits!r}-bit")
        if layout not in GPTQ_FORMATS:
            raise _refuse(model_dir, q, f"checkpoint_format {layout!r} is not AutoGPTQ's gptq or gptq_v2 packing")
        return PublishedFormat("gptq", bits, group, layout == "gptq", q.get("desc_act") is True)
    version = str(q.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or q.get("zero_point", True) is not True:
        raise _refuse(model_dir, q, "kiln reads AutoAWQ's 4-bit GEMM packing with zero points only")
    return PublishedFormat("awq", 4, group, False)


class QuantizedFileOverlay:
    """GPTQ-for-LLaMa's one safetensors file (`--quant_ckpt_path`, AutoGPTQ v1 tensors under the Hugging Face names)
    laid over the float checkpoint beside it: a tensor in the file replaces the checkpoint's, and a layer with a
    qweight there hides the checkpoint's float `<prefix>.weight`. Read with safetensors only (never unpickled)."""

    def __init__(self, checkpoint: HFCheckpoint, path: Path) -> None:
        from safetensors import safe_open

        if path.suffix != ".safetensors" or not path.is_file():
            raise ConfigError(f"--quant_ckpt_path {path}: kiln reads GPTQ-for-LLaMa's .safetensors file (an existing "
                              "file); convert .pt/.npz checkpoints to safetensors first")
        try:
            self.file = safe_open(str(path), framework="pt")
            self.file_names = set(self.file.keys())
        except Exception as err:  # safetensors raises several types for a damaged header
            raise ConfigError(f"--quant_ckpt_path {path} is not a readable safetensors file ({err})") from err
        self.checkpoint, self.dir, self.config = checkpoint, checkpoint.dir, checkpoint.config
        quantized = {n[: -len(".qweight")] for n in self.file_names if n.endswith(".qweight")}
        if not quantized:
            raise ConfigError(f"--quant_ckpt_path {path} holds no qweight tensors: not a GPTQ checkpoint")
        self._names = (checkpoint.names() - {f"{p}.weight" for p in quantized}) | self.file_names

    def names(self) -> set[str]:
        return set(self._names)

    def get(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(name) if name in self.file_names else self.checkpoint.get(name)

    def act_order(self, group_size: int) -> bool:
        """Whether any layer's g_idx is not `k // group_size` (GPTQ-for-LLaMa's --act-order)."""
        for name in sorted(n for n in self.file_names if n.endswith(".g_idx")):
            g_idx = self.file.get_tensor(name).long()
            if not torch.equal(g_idx, torch.arange(g_idx.numel()) // group_size):
                return True
        return False


class PublishedView:
    """An HFCheckpoint as the family weight maps expect it: each published linear seen as `<prefix>.weight`, whose
    float value (for a layer kiln keeps unquantized) is its exact dequantized weight."""

    def __init__(self, checkpoint: HFCheckpoint, fmt: PublishedFormat) -> None:
        self.checkpoint, self.fmt, self.dir, self.config = checkpoint, fmt, checkpoint.dir, checkpoint.config
        names = checkpoint.names()
        self.prefixes = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
        hidden = {f"{p}.{part}" for p in self.prefixes for part in PARTS}
        self._names = (names - hidden) | {f"{p}.weight" for p in self.prefixes}

    def names(self) -> set[str]:
        return set(self._names)

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.prefixes

    def read(self, name: str):
        """`<prefix>.weight` -> q [out, in] int16, scale and zero [out, groups], g_idx [in] or None."""
        prefix = name[: -len(".weight")]
        present = self.checkpoint.names()
        tensors = {p: self.checkpoint.get(f"{prefix}.{p}") for p in PARTS if f"{prefix}.{p}" in present}
        missing = [p for p in PARTS[:3] if p not in tensors]
        if missing:
            raise ConfigError(f"{self.dir}: {prefix} has a qweight but no {', '.join(missing)}; the checkpoint is "
                              "incomplete")
        wrong = [f"{p} {t.dtype}" for p, t in tensors.items()
                 if (t.dtype != torch.int32) == (p != "scales") or (p == "scales" and not t.dtype.is_floating_point)]
        if wrong:
            raise ConfigError(f"{self.dir}: {prefix} holds {', '.join(wrong)}; published GPTQ/AWQ layers hold int32 "
                              "qweight, qzeros and g_idx and floating-point scales (damaged or another format)")
        return self.fmt.read(tensors, f"{self.dir}: {prefix}")

    def get(self, name: str) -> torch.Tensor:
        if not self.is_quantized(name):
            return self.checkpoint.get(name)
        q, scale, zero, g_idx = self.read(name)
        g = g_idx if g_idx is not None else torch.arange(q.shape[1]) // self.group_size(q, scale)
        return (q.float() - zero[:, g]) * scale[:, g]  # [out, in]

    @staticmethod
    def group_size(q: torch.Tensor, scale: torch.Tensor) -> int:
        return -(-q.shape[1] // scale.shape[1])


def _by_shape(names: list[str], tensors: list[torch.Tensor]) -> str:
    """`(48, 64): a, b, c, ... (+13 more); (64, 64): d`: which parts have which shape (a DBRX w13 has 32 parts)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for n, t in zip(names, tensors):
        groups.setdefault(tuple(t.shape), []).append(n)
    return "; ".join(f"{shape}: {', '.join(ns[:3])}" + (f" ... (+{len(ns) - 3} more)" if len(ns) > 3 else "")
                     for shape, ns in groups.items())


class PublishedWeightSource(HFWeightSource):
    """Full kiln tensors of a published GPTQ/AWQ checkpoint: floats through the family map, and for each quantized
    kiln weight its published values (`quantized_weight`), which convert shards and repacks without rounding."""

    def __init__(self, checkpoint: HFCheckpoint, family: Family, config: ModelConfig, source_layers: int,
                 fmt: PublishedFormat, group_size: int) -> None:
        self.view, self.family_name, self.group = PublishedView(checkpoint, fmt), family.name, group_size
        super().__init__(self.view, family, config, source_layers)  # type: ignore[arg-type]

    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("_g_idx"):  # act-order: the weight's group indices [in] int32
            return self._g_idx(name[: -len("_g_idx")])
        return super().full_tensor(name, shape)

    def _g_idx(self, weight: str) -> torch.Tensor:
        """One g_idx for kiln weight `weight`: its fused parts share their inputs, so they must share it too."""
        names = sources_for(find_rule(self.rules, weight), weight)
        found = []
        for n in names:
            q, _, _, g_idx = self.view.read(n)
            found.append(g_idx if g_idx is not None else torch.arange(q.shape[1]) // self.group)
        if any(not torch.equal(g, found[0]) for g in found[1:]):
            raise ConfigError(f"{self.view.dir}: {', '.join(names)} are fused into kiln's {weight} but have "
                              "different act-order g_idx; kiln cannot fuse them exactly")
        return found[0].to(torch.int32)

    def check_quantized(self, names: list[str]) -> None:
        """Before any tensor is read: every kiln weight that kiln quantizes must come from published quantized
        layers (a layer the checkpoint kept in float would otherwise be found halfway through convert)."""
        for name in names:
            plain = [n for n in sources_for(find_rule(self.rules, name), name) if not self.view.is_quantized(n)]
            if plain:
                raise ConfigError(f"{self.view.dir}: {', '.join(plain)} is not quantized, but kiln runs every linear "
                                  f"layer of a {self.view.fmt.quant_algo} checkpoint quantized; convert the "
                                  "unquantized checkpoint instead")

    def quantized_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """kiln weight `name` -> q [(experts,) out, in] int16, scale and zero [(experts,) out, groups]: the parts
        fused along out (and stacked over experts) by the weight rule's own transform."""
        rule = find_rule(self.rules, name)
        names = sources_for(rule, name)
        self.check_quantized([name])
        if rule.transform not in EXACT_RULES:
            raise ConfigError(f"{self.view.dir}: kiln cannot map published quantized {', '.join(names)} onto {name} "
                              f"({self.family_name}'s {rule.transform} layout) yet; convert the unquantized checkpoint")
        parts = [self.view.read(n) for n in names]
        for n, (q, scale, _, g_idx) in zip(names, parts):
            self._check_groups(n, q, scale, g_idx)
        fuse = TRANSFORMS[rule.transform]
        try:
            return tuple(fuse([p[i] for p in parts], self.config) for i in range(3))  # type: ignore[return-value]
        except RuntimeError as err:  # parts that do not stack: a layer of the wrong size
            raise CheckpointError(f"cannot make {name} from parts of these sizes (values [out, in]): "
                                  f"{_by_shape(names, [p[0] for p in parts])}; {err}") from err

    def _check_groups(self, name: str, q: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor | None) -> None:
        """The published groups must be kiln's `k // group_size`, or (act-order) any g_idx into them."""
        plain = torch.arange(q.shape[1]) // self.group
        if scale.shape[1] != int(plain[-1]) + 1:
            raise ConfigError(f"{self.view.dir}: {name} has {scale.shape[1]} groups over {q.shape[1]} inputs, not "
                              f"groups of {self.group}; the checkpoint does not match its quantization config")
        if g_idx is not None and (g_idx.shape != plain.shape or int(g_idx.min()) < 0
                                  or int(g_idx.max()) >= scale.shape[1]):
            raise ConfigError(f"{self.view.dir}: {name}.g_idx is not {q.shape[1]} group indices below "
                              f"{scale.shape[1]}; the checkpoint is damaged")
        if g_idx is not None and not self.view.fmt.act_order and not torch.equal(g_idx, plain):
            raise ConfigError(f"{self.view.dir}: {name} has a permuted (act-order) g_idx but the quantization config "
                              "says desc_act false; the checkpoint does not match its config")
