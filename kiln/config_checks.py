"""Type and size checks of a model config's fields, so that an edited config.json is refused with one line naming the
field instead of failing deep inside a model constructor, or growing memory until the host dies.

The bounds are far above every published model (DBRX: 40 layers, d_model 6144, 16 experts; MPT-30B: 48 layers,
7168; Baichuan2-13B: 40 layers, 5120, vocab 125696) and far below what would exhaust a host while kiln builds its
lists of names and its meta models."""

from __future__ import annotations

import math
from typing import Any

# field -> (smallest, largest) allowed value
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 17),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096),
    "intermediate_size": (1, 1 << 20),
    "max_position_embeddings": (1, 1 << 24),
    "moe_num_experts": (0, 4096),
    "moe_top_k": (0, 4096),
    "head_size": (0, 1 << 14),
}
FLOAT_FIELDS = ("norm_epsilon", "rotary_base", "alibi_bias_max")
OPTIONAL_FLOAT_FIELDS = ("clip_qkv", "softmax_scale", "logit_scale", "moe_normalize_p")
STR_FIELDS = ("architecture", "family", "dtype", "hidden_act", "norm_type", "position_embedding_type")
TOKEN_FIELDS = ("bos_token_id", "pad_token_id")


class FieldError(ValueError):
    """A config field of the wrong type or outside kiln's bounds (a ConfigError subclass is made in config.py)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(config: Any, error: type[ValueError]) -> None:
    """Raise `error` naming the first field of `config` (a ModelConfig) that has the wrong type or is out of bounds."""
    for name, (low, high) in INT_BOUNDS.items():
        value = getattr(config, name)
        if not _is_int(value):
            raise error(f"config field {name} must be an integer, got {value!r} ({type(value).__name__}); fix "
                        "config.json")
        if not low <= value <= high:
            raise error(f"config field {name} is {value}, outside kiln's bounds {low}..{high}; fix config.json")
    for name in FLOAT_FIELDS:
        value = getattr(config, name)
        if not _is_real(value) or value < 0:
            raise error(f"config field {name} must be a finite number >= 0, got {value!r}; fix config.json")
    for name in OPTIONAL_FLOAT_FIELDS:
        value = getattr(config, name)
        if value is not None and (not _is_real(value) or value <= 0):
            raise error(f"config field {name} must be a positive number or null, got {value!r}; fix config.json")
    for name in STR_FIELDS:
        if not isinstance(getattr(config, name), str):
            raise error(f"config field {name} must be a string, got {getattr(config, name)!r}; fix config.json")
    for name in TOKEN_FIELDS:
        value = getattr(config, name)
        if value is not None and not (_is_int(value) and value >= 0):
            raise error(f"config field {name} must be a token id >= 0 or null, got {value!r}; fix config.json")
    eos = config.eos_token_id
    eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(_is_int(i) and i >= 0 for i in eos_list):
        raise error(f"config field eos_token_id must be a token id, a list of them or null, got {eos!r}")
    if not all(isinstance(getattr(config, n), bool) for n in ("norm_bias", "linear_bias", "qk_layernorm",
                                                                "tie_word_embeddings", "norm_head")):
        raise error("config fields norm_bias, linear_bias, qk_layernorm, tie_word_embeddings and norm_head must be "
                    "true or false; fix config.json")


def check_heads(config: Any, error: type[ValueError]) -> None:
    """The attention heads must cover the hidden size exactly (head_size × heads == hidden_size); a model whose
    heads leave part of the hidden state out would run and give wrong answers."""
    if config.head_size * config.num_attention_heads != config.hidden_size:
        raise error(f"{config.num_attention_heads} attention heads of size {config.head_size} do not cover the hidden "
                    f"size {config.hidden_size}; hidden_size must be num_attention_heads × head size")
    if config.num_key_value_heads > config.num_attention_heads:
        raise error(f"num_key_value_heads ({config.num_key_value_heads}) exceeds num_attention_heads "
                    f"({config.num_attention_heads})")
