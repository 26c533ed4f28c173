"""MPT (mosaicml/mpt-7b, -instruct, -chat, -storywriter, -8k, mpt-30b and their variants): ALiBi, exact-GELU MLP,
LayerNorm, fused Wqkv with optional clip_qkv and qk_ln, optional GQA, tied LM head, optional logit_scale.

Two architecture names reach here: `MPTForCausalLM` (the published checkpoints' remote code, i.e. llm-foundry
[LLMF]) and `MptForCausalLM` (transformers [TF]). Both read the same config.json (nested `attn_config`) and the same
tensor names; where the two codes' defaults differ for a key the file leaves out, each spelling gets its own code's
default. Facts: docs/model-facts.md §2 and §4.
"""

from __future__ import annotations

import math
from typing import Any

from kiln.config import ConfigError, ModelConfig
from kiln.models.decoder import DecoderForCausalLM
from kiln.models.family import Family, WeightRule, hf_dtype

REMOTE_CODE_ARCH = "MPTForCausalLM"  # llm-foundry's class, what the published config.json names
TRANSFORMERS_ARCH = "MptForCausalLM"


class MptForCausalLM(DecoderForCausalLM):
    """MPT: pre-norm blocks of LayerNorm (biases unless no_bias), fused Wqkv (±clip_qkv, optional whole-vector
    qk_ln, MHA/MQA/GQA), ALiBi with alibi_bias_max, exact-GELU MLP of expansion_ratio * d_model, LM head tied to
    the token embedding, logits times logit_scale."""


def _refuse(field: str, value: Any, supported: str) -> None:
    raise ConfigError(f"MPT config {field}={value!r} is not supported: {supported}. kiln refuses configs it cannot "
                      "run exactly rather than run them approximately")


def _defaults(hf: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the code the architecture name selects. llm-foundry's MPTConfig defaults to no_bias false and
    attn_config.alibi false [LLMF configuration_mpt.py, config_defaults.py]; transformers' MptConfig to no_bias true
    and alibi true [TF configuration_mpt.py]. Published config.json files spell all of these out."""
    arch = (hf.get("architectures") or [REMOTE_CODE_ARCH])[0]
    if arch == TRANSFORMERS_ARCH:
        return {"no_bias": True, "alibi": True}
    return {"no_bias": False, "alibi": False}


def _check_attention(attn: dict[str, Any], alibi: bool, hf: dict[str, Any]) -> None:
    """Refuse every attention option that changes the computation in a way kiln does not implement."""
    if attn.get("prefix_lm", False):
        _refuse("attn_config.prefix_lm", True, "prefix-LM attention (bidirectional over a prefix) is not implemented; "
                "only causal attention (prefix_lm false) is")
    if attn.get("attn_uses_sequence_id", False):
        _refuse("attn_config.attn_uses_sequence_id", True, "attention restricted by sequence id is not implemented")
    if attn.get("rope", False):
        _refuse("attn_config.rope", True, "MPT with rotary embeddings is not implemented; MPT runs with ALiBi")
    if attn.get("qk_gn", False):
        _refuse("attn_config.qk_gn", True, "group-normalised q/k is not implemented (qk_ln is)")
    if not attn.get("fused_qkv", True):
        _refuse("attn_config.fused_qkv", False, "only the fused Wqkv weight layout is supported")
    if attn.get("sliding_window_size", -1) not in (-1, None):
        _refuse("attn_config.sliding_window_size", attn["sliding_window_size"], "sliding-window attention is not "
                "implemented (-1 only)")
    if attn.get("attn_logit_softcapping") is not None:
        _refuse("attn_config.attn_logit_softcapping", attn["attn_logit_softcapping"], "attention soft-capping is not "
                "implemented (null only)")
    if attn.get("kv_dim") is not None or attn.get("flex_attn_mod_list"):
        _refuse("attn_config.kv_dim/flex_attn_mod_list", attn.get("kv_dim") or attn.get("flex_attn_mod_list"),
                "cross-attention and flex-attention modifications are not implemented")
    if not alibi:
        # Without ALiBi, llm-foundry adds learned absolute position embeddings (a `transformer.wpe` tensor) or none.
        what = "learned position embeddings (wpe)" if hf.get("learned_pos_emb", True) else "no position information"
        _refuse("attn_config.alibi", False, f"that model uses {what}, which kiln does not implement; MPT runs with "
                "alibi true (every published MPT checkpoint)")


def _kv_heads(attn: dict[str, Any], n_heads: int) -> int:
    """KV heads by attn_type, as llm-foundry builds them: MHA n_heads, MQA 1, GQA kv_n_heads [LLMF attention.py]."""
    kind = attn.get("attn_type", "multihead_attention")
    if kind == "multihead_attention":
        kv = attn.get("kv_n_heads")
        if kv not in (None, n_heads):
            _refuse("attn_config.kv_n_heads", kv, f"with attn_type multihead_attention it must be absent or n_heads "
                    f"({n_heads}); set attn_type grouped_query_attention for GQA")
        return n_heads
    if kind == "multiquery_attention":
        return 1
    if kind == "grouped_query_attention":
        kv = attn.get("kv_n_heads")
        if not isinstance(kv, int) or kv < 1 or n_heads % kv:
            _refuse("attn_config.kv_n_heads", kv, f"grouped_query_attention needs a kv_n_heads that divides n_heads "
                    f"({n_heads})")
        return kv
    _refuse("attn_config.attn_type", kind, "use multihead_attention, multiquery_attention or grouped_query_attention")
    return 0  # unreachable: _refuse raises


def _ffn_size(hf: dict[str, Any]) -> int:
    """The MLP width: ffn_config.ffn_hidden_size when given, else expansion_ratio * d_model, which must be whole."""
    ffn = hf.get("ffn_config") or {}
    if ffn.get("ffn_type", "mptmlp") != "mptmlp":
        _refuse("ffn_config.ffn_type", ffn["ffn_type"], "only the plain GELU MLP (mptmlp) is implemented; GLU, MoE "
                "and TransformerEngine feed-forward types are not")
    act = ffn.get("ffn_act_fn") or {"name": "gelu", "approximate": "none"}
    if act.get("name") != "gelu" or act.get("approximate", "none") != "none":
        _refuse("ffn_config.ffn_act_fn", act, "only exact GELU ({'name': 'gelu', 'approximate': 'none'}) is implemented")
    if ffn.get("ffn_hidden_size") is not None:
        return int(ffn["ffn_hidden_size"])
    size = hf["d_model"] * hf.get("expansion_ratio", 4)
    if size != int(size):
        _refuse("expansion_ratio", hf.get("expansion_ratio"), f"expansion_ratio * d_model ({size}) must be a whole "
                "number")
    return int(size)


def _logit_scale(hf: dict[str, Any]) -> float | None:
    value = hf.get("logit_scale")
    if value is None or value == "inv_sqrt_d_model":
        # llm-foundry MPTForCausalLM: 'inv_sqrt_d_model' means 1/sqrt(d_model) [LLMF modeling_mpt.py]
        return None if value is None else 1.0 / math.sqrt(hf["d_model"])
    if isinstance(value, str) or not isinstance(value, (int, float)):
        _refuse("logit_scale", value, "use a number, null or 'inv_sqrt_d_model'")
    return float(value)


def _check_model(hf: dict[str, Any]) -> None:
    norm = str(hf.get("norm_type", "low_precision_layernorm")).lower()
    if norm not in ("low_precision_layernorm", "layernorm"):
        _refuse("norm_type", hf.get("norm_type"), "only layernorm and low_precision_layernorm are implemented (the "
                "latter is a plain LayerNorm outside mixed-precision training [LLMF norm.py])")
    fc = hf.get("fc_type", "torch")
    fc_name = fc.get("name", "torch") if isinstance(fc, dict) else fc
    if fc_name != "torch":
        _refuse("fc_type", fc, "only torch Linear layers (fc_type torch) are supported")
    if hf.get("residual_modification") is not None:
        _refuse("residual_modification", hf["residual_modification"], "only the plain residual x + f(x) is implemented")
    if hf.get("block_overrides"):
        _refuse("block_overrides", hf["block_overrides"], "per-layer block overrides are not implemented")
    if not hf.get("use_pad_tok_in_ffn", True):
        _refuse("use_pad_tok_in_ffn", False, "kiln never feeds pad tokens, so only true is meaningful here")


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
    """Read an MPT config.json (either architecture spelling); refuse what kiln cannot run exactly."""
    for key in ("d_model", "n_heads", "n_layers", "vocab_size"):
        if key not in hf:
            raise ConfigError(f"MPT config.json lacks {key!r}; is this an MPT checkpoint?")
    defaults = _defaults(hf)
    attn = hf.get("attn_config") or {}
    alibi = bool(attn.get("alibi", defaults["alibi"]))
    _check_attention(attn, alibi, hf)
    _check_model(hf)
    n_heads, d_model = hf["n_heads"], hf["d_model"]
    if d_model % n_heads:
        _refuse("n_heads", n_heads, f"d_model ({d_model}) must be a multiple of n_heads")
    softmax_scale = attn.get("softmax_scale")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        _refuse("attn_config.softmax_scale", softmax_scale, "use a positive number or null (1/sqrt(head_dim))")
    bias = not hf.get("no_bias", defaults["no_bias"])
    return ModelConfig(
        architecture=TRANSFORMERS_ARCH,
        family="mpt",
        dtype=dtype or hf_dtype(hf),
        vocab_size=hf["vocab_size"],
        hidden_size=d_model,
        num_hidden_layers=hf["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=_kv_heads(attn, n_heads),
        intermediate_size=_ffn_size(hf),
        hidden_act="gelu",  # exact GELU, nn.GELU(approximate='none') [LLMF ffn.py, TF MptMLP]
        max_position_embeddings=hf.get("max_seq_len", 2048),
        norm_type="layernorm",
        # llm-foundry always builds its norms with eps 1e-5; transformers reads layer_norm_epsilon (default 1e-5),
        # which only configs it wrote carry.
        norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        # no_bias removes the bias of every module that has one: Linear and LayerNorm alike [LLMF modeling_mpt.py]
        norm_bias=bias,
        linear_bias=bias,
        position_embedding_type="alibi",
        alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
        clip_qkv=None if attn.get("clip_qkv") is None else float(attn["clip_qkv"]),
        qk_layernorm=bool(attn.get("qk_ln", False)),
        softmax_scale=None if softmax_scale is None else float(softmax_scale),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        logit_scale=_logit_scale(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def weight_rules(config: ModelConfig) -> list[WeightRule]:
    """HF names (identical in the remote code and transformers) -> kiln names; biases and q/k norms by config."""
    block = "transformer.blocks.{layer}"
    pairs = [
        ("layers.{layer}.input_norm", f"{block}.norm_1", config.norm_bias),
        ("layers.{layer}.attn.qkv_proj", f"{block}.attn.Wqkv", config.linear_bias),
        ("layers.{layer}.attn.o_proj", f"{block}.attn.out_proj", config.linear_bias),
        ("layers.{layer}.post_attn_norm", f"{block}.norm_2", config.norm_bias),
        ("layers.{layer}.ffn.up_proj", f"{block}.ffn.up_proj", config.linear_bias),
        ("layers.{layer}.ffn.down_proj", f"{block}.ffn.down_proj", config.linear_bias),
        ("norm", "transformer.norm_f", config.norm_bias),
    ]
    if config.qk_layernorm:
        pairs += [("layers.{layer}.attn.q_norm", f"{block}.attn.q_ln", config.norm_bias),
                  ("layers.{layer}.attn.k_norm", f"{block}.attn.k_ln", config.norm_bias)]
    rules = [WeightRule("embed_tokens.weight", ("transformer.wte.weight",))]
    for kiln_name, hf_name, has_bias in pairs:
        rules.append(WeightRule(f"{kiln_name}.weight", (f"{hf_name}.weight",)))
        if has_bias:
            rules.append(WeightRule(f"{kiln_name}.bias", (f"{hf_name}.bias",)))
    # The published checkpoints have no lm_head tensor: the head is the token embedding [LLMF modeling_mpt.py].
    # llm-foundry's untied variant has its own bias-free `lm_head`.
    head = "transformer.wte.weight" if config.tie_word_embeddings else "lm_head.weight"
    rules.append(WeightRule("lm_head.weight", (head,)))
    return rules


def _preset(d_model: int, n_heads: int, n_layers: int, max_seq_len: int, vocab: int = 50432) -> dict[str, Any]:
    """A config.json as the published MPT checkpoints write it (mpt-30b's, model-facts.md §2 [MPTCFG])."""
    return {
        "architectures": [REMOTE_CODE_ARCH], "model_type": "mpt", "torch_dtype": "bfloat16",
        "d_model": d_model, "n_heads": n_heads, "n_layers": n_layers, "expansion_ratio": 4,
        "max_seq_len": max_seq_len, "vocab_size": vocab, "no_bias": True, "norm_type": "low_precision_layernorm",
        "learned_pos_emb": True, "logit_scale": None, "emb_pdrop": 0, "resid_pdrop": 0, "embedding_fraction": 1.0,
        "init_device": "cpu", "use_cache": False, "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                        "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
    }


PRESETS = {
    "mpt-7b": _preset(4096, 32, 32, 2048),
    "mpt-30b": _preset(7168, 64, 48, 8192),
    # Same structure at toy size (6 heads: not a power of two, so the ALiBi slope interleave is exercised).
    "mpt-tiny": _preset(48, 6, 2, 512, vocab=512),
}

FAMILY = Family(
    name="mpt",
    architectures=(REMOTE_CODE_ARCH, TRANSFORMERS_ARCH),
    model_class=MptForCausalLM,
    config_from_hf=config_from_hf,
    weight_rules=weight_rules,
    presets=PRESETS,
    # transformers' save_pretrained may write the tied head; with a tied head it is the embedding by definition.
    ignored_sources=(r"^lm_head\.weight$",),
)
