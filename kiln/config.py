"""Configs that pass between kiln's stages: the normalised model, the parallel mapping, quantization and build limits.

A checkpoint's config.json holds `ModelConfig`'s fields at the top level (as TensorRT-LLM's checkpoint format does)
plus `mapping` and `quantization`; an engine's adds `build` and `memory_plan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.config_checks import check_fields, check_heads

FORMAT_VERSION = 1  # bumped whenever checkpoint or engine files change incompatibly

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConfigError(ValueError):
    """A config that kiln cannot use, with what is wrong and how to fix it."""


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")


@dataclass
class ModelConfig:
    """The architecture of one model, normalised across families (every field a model file needs, nothing else)."""

    architecture: str  # kiln's canonical class name, e.g. "DbrxForCausalLM"
    family: str  # "dbrx", "mpt" or "baichuan"
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    hidden_act: str  # "silu" (GLU experts / SwiGLU) or "gelu" (exact GELU MLP)
    max_position_embeddings: int
    norm_type: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_epsilon: float = 1e-5
    norm_bias: bool = False
    linear_bias: bool = False
    position_embedding_type: str = "rope_gpt_neox"  # or "alibi"
    rotary_base: float = 10000.0
    alibi_bias_max: float = 8.0
    clip_qkv: float | None = None
    qk_layernorm: bool = False
    softmax_scale: float | None = None  # None means head_dim ** -0.5
    tie_word_embeddings: bool = False
    logit_scale: float | None = None
    norm_head: bool = False  # Baichuan2's NormHead: LM head rows L2-normalised, applied once at convert
    moe_num_experts: int = 0
    moe_top_k: int = 0
    moe_normalize_p: float | None = None  # renormalise top-k weights by their p-norm (DBRX: 1)
    head_size: int = 0  # 0 means hidden_size // num_attention_heads
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # Types and bounds first: a string, null or zero here would otherwise fail inside the division below.
        check_fields(self, ConfigError)
        if self.head_size == 0:
            self.head_size = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        check_fields(self, ConfigError)
        check_heads(self, ConfigError)
        torch_dtype(self.dtype)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.norm_type not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"norm_type must be layernorm or rmsnorm, got {self.norm_type!r}")
        if self.position_embedding_type not in ("rope_gpt_neox", "alibi"):
            raise ConfigError(f"position_embedding_type must be rope_gpt_neox or alibi, not {self.position_embedding_type!r}")
        if self.moe_num_experts and not 0 < self.moe_top_k <= self.moe_num_experts:
            raise ConfigError(f"moe_top_k ({self.moe_top_k}) must be in 1..moe_num_experts ({self.moe_num_experts})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"model config lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Mapping:
    """Where one rank sits in the world: tensor, pipeline and expert parallel coordinates.

    Ranks are ordered tp fastest: rank = pp_rank * tp_size + tp_rank. For the experts, the tp group is split again
    into moe_ep_size × moe_tp_size (ep slowest), so that moe_tp_size × moe_ep_size = tp_size."""

    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int = 1
    moe_ep_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"mapping field {name} must be an integer, got {value!r}")
        if self.tp_size < 1 or self.pp_size < 1:
            raise ConfigError(f"tp_size and pp_size must be >= 1, got {self.tp_size} and {self.pp_size}")
        if self.world_size != self.tp_size * self.pp_size:
            raise ConfigError(f"world_size {self.world_size} must equal tp_size × pp_size = {self.tp_size * self.pp_size}")
        if self.moe_tp_size * self.moe_ep_size != self.tp_size:
            raise ConfigError(
                f"moe_tp_size ({self.moe_tp_size}) × moe_ep_size ({self.moe_ep_size}) must equal tp_size ({self.tp_size})"
            )
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside the world of {self.world_size}")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank % self.moe_tp_size

    @property
    def moe_ep_rank(self) -> int:
        return self.tp_rank // self.moe_tp_size

    def for_rank(self, rank: int) -> "Mapping":
        return dataclasses.replace(self, rank=rank)

    def to_dict(self) -> dict[str, int]:
        data = dataclasses.asdict(self)
        del data["rank"]
        return data


GROUP_WISE_QUANT_ALGOS = ("W4A16_AWQ", "W4A16_GPTQ", "W8A16_GPTQ")  # W8A16_GPTQ: published 8-bit GPTQ only
# FP8 weights and activations (kiln.quant.fp8), TensorRT-LLM's names (FP8_PER_TENSOR_PER_TOKEN is kiln's).
FP8_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PER_TENSOR_PER_TOKEN")
# SmoothQuant W8A8 formats, TensorRT-LLM's names (kiln.quant.smoothquant.SQ_ALGOS says what each means).
SMOOTHQUANT_ALGOS = ("W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
                     "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN")
QUANT_ALGOS = (None, "W8A16", "W4A16", *GROUP_WISE_QUANT_ALGOS, *FP8_ALGOS, *SMOOTHQUANT_ALGOS)
# The formats whose LM head can be quantized too (--quantize_lm_head): the weight-only ones kiln makes itself.
LM_HEAD_QUANT_ALGOS = ("W8A16", "W4A16", "W4A16_AWQ", "W4A16_GPTQ")


@dataclass
class QuantConfig:
    """How the checkpoint's weights and KV cache are quantized (None: not quantized)."""

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int = 128
    has_zero_point: bool = False  # group-wise formats: asymmetric, with zero points
    act_order: bool = False  # group-wise: every layer keeps `<name>_g_idx` (published act-order GPTQ checkpoints)
    exclude_modules: list[str] = field(default_factory=list)
    smoothquant_val: float | None = None  # SmoothQuant's alpha (W8A8_SQ_* algos; TensorRT-LLM's field name)
    # --quantize_lm_head: the LM head is quantized like the other linears (kiln.quant.lm_head); False keeps it in the
    # engine dtype (TensorRT-LLM's default). Explicit, because older W8A16/W4A16 checkpoints record no exclude_modules.
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        # Weight-only per-channel INT8/INT4, group-wise INT4 (AWQ, GPTQ), FP8 and SmoothQuant W8A8; every other
        # format is refused by name.
        if self.quant_algo in SMOOTHQUANT_ALGOS:  # SmoothQuant W8A8 (kiln.quant.smoothquant)
            if not isinstance(self.smoothquant_val, (int, float)) or not 0.0 <= self.smoothquant_val <= 1.0:
                raise ConfigError(f"{self.quant_algo} needs a SmoothQuant alpha in [0, 1] (--smoothquant ALPHA), "
                                  f"got {self.smoothquant_val!r}")
        if self.quant_algo not in QUANT_ALGOS:
            raise ConfigError(
                f"quantization {self.quant_algo!r} is not supported by this kiln version "
                f"({', '.join(a for a in QUANT_ALGOS if a)} are); convert with those or without quantization flags"
            )
        # 32, 64, 128 from the flags; a published checkpoint's group_size -1 (one group per row) becomes the
        # largest input width rounded up to 32 (kiln.quant.published_group_wise), which the kernels also run.
        if self.quant_algo in GROUP_WISE_QUANT_ALGOS and not (
                isinstance(self.group_size, int) and self.group_size > 0 and self.group_size % 32 == 0):
            raise ConfigError(f"group size {self.group_size!r} is not one kiln runs for {self.quant_algo}; use "
                              "--group_size 32, 64 or 128")
        if self.act_order and self.quant_algo not in GROUP_WISE_QUANT_ALGOS:
            raise ConfigError(f"act_order applies to the group-wise formats only, not {self.quant_algo!r}")
        if self.quantize_lm_head not in (True, False):
            raise ConfigError(f"quantization.quantize_lm_head must be true or false, got {self.quantize_lm_head!r}")
        if self.quantize_lm_head and (self.quant_algo not in LM_HEAD_QUANT_ALGOS or self.act_order):
            raise ConfigError(f"--quantize_lm_head goes with the weight-only formats {', '.join(LM_HEAD_QUANT_ALGOS)} "
                              f"(--use_weight_only --weight_only_precision int8|int4|int4_awq|int4_gptq), not "
                              f"{self.quant_algo or 'an unquantized model'}; drop the flag or choose one of those")
        if self.quantize_lm_head and "lm_head" in self.exclude_modules:
            raise ConfigError("quantization.quantize_lm_head is true but exclude_modules keeps lm_head in float; "
                              "the checkpoint's config.json contradicts itself: convert it again")
        # INT8 / FP8 KV cache with calibrated scales (kiln.quant.kv_cache), TensorRT-LLM's names.
        if self.kv_cache_quant_algo not in (None, "INT8", "FP8"):
            raise ConfigError(f"kv_cache_quant_algo {self.kv_cache_quant_algo!r} is not supported by this kiln "
                              "version (INT8 and FP8 are); convert with --int8_kv_cache, --fp8_kv_cache or neither")


@dataclass
class BuildConfig:
    """The limits an engine is built for; below them every shape is dynamic."""

    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_beam_width: int = 4
    max_num_tokens: int = 8192  # tokens computed in one step (prefill chunks + decodes)
    kv_block_size: int = 16

    def validate(self, model: ModelConfig) -> None:
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens", "kv_block_size"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"build field {name} must be an integer, got {getattr(self, name)!r}")
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_input_len >= self.max_seq_len:
            raise ConfigError(
                f"--max_input_len ({self.max_input_len}) must be smaller than --max_seq_len ({self.max_seq_len}), "
                "which counts prompt and output tokens together"
            )
        if self.max_seq_len > model.max_position_embeddings:
            raise ConfigError(
                f"--max_seq_len {self.max_seq_len} exceeds the model's max_position_embeddings "
                f"{model.max_position_embeddings}; pass a value up to that"
            )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def dataclass_from_dict(cls: type, data: dict[str, Any] | None, what: str) -> Any:
    """Build a config dataclass from a dict, naming unknown keys instead of failing inside the constructor."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(data).__name__}")
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{what} has unknown fields {unknown}; was it written by a newer kiln?")
    return cls(**data)
