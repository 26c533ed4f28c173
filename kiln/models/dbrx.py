"""DBRX (databricks/dbrx-base, dbrx-instruct): fine-grained MoE, GQA, NeoX RoPE with theta 500000, clip_qkv.

Facts from the published config and modeling file [DBX] and transformers [TF]; see docs/model-facts.md §1. The
"converted" layout's module names are AutoGPTQ's `auto_gptq/modeling/dbrx_converted.py` (PR #625) [AGQ].
"""

from __future__ import annotations

import re
from typing import Any

from kiln.config import ConfigError, ModelConfig
from kiln.models.decoder import DecoderForCausalLM
from kiln.models.family import Family, WeightLayout, WeightRule, hf_dtype


class DbrxForCausalLM(DecoderForCausalLM):
    """DBRX: bias-free LayerNorm, fused QKV clamped to ±clip_qkv, GQA, RoPE, 16-choose-4 GLU experts, untied head."""


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
    """Read the published DBRX config.json (nested attn_config and ffn_config)."""
    attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    if act != "silu":
        raise ConfigError(f"DBRX ffn_act_fn {act!r} is not supported; the published models use silu")
    if ffn.get("uniform_expert_assignment", False):
        raise ConfigError("DBRX uniform_expert_assignment=true is a training-only setting; kiln serves false only")
    if hf.get("tie_word_embeddings", False):
        raise ConfigError("DBRX with tie_word_embeddings=true is not a published configuration")
    normalize = ffn.get("moe_normalize_expert_weights", 1)
    return ModelConfig(
        architecture="DbrxForCausalLM",
        family="dbrx",
        dtype=dtype or hf_dtype(hf),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["d_model"],
        num_hidden_layers=hf["n_layers"],
        num_attention_heads=hf["n_heads"],
        num_key_value_heads=attn.get("kv_n_heads", 1),
        intermediate_size=ffn.get("ffn_hidden_size", 3584),
        hidden_act="silu",
        max_position_embeddings=hf.get("max_seq_len", 2048),
        norm_type="layernorm",
        norm_epsilon=1e-5,  # torch's LayerNorm default; DBRX sets none [DBX]
        position_embedding_type="rope_gpt_neox",
        # The trap: theta lives in attn_config. transformers 5.x ignores it and uses 10000 (model-facts.md §1 (a)).
        rotary_base=float(attn.get("rope_theta", hf.get("rope_theta", 10000.0))),
        clip_qkv=attn.get("clip_qkv"),
        moe_num_experts=ffn.get("moe_num_experts", 4),
        moe_top_k=ffn.get("moe_top_k", 1),
        moe_normalize_p=None if normalize is None else float(normalize),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def weight_rules(config: ModelConfig) -> list[WeightRule]:
    block = "transformer.blocks.{layer}"
    return [
        WeightRule("embed_tokens.weight", ("transformer.wte.weight",)),
        WeightRule("layers.{layer}.input_norm.weight", (f"{block}.norm_attn_norm.norm_1.weight",)),
        WeightRule("layers.{layer}.attn.qkv_proj.weight", (f"{block}.norm_attn_norm.attn.Wqkv.weight",)),
        WeightRule("layers.{layer}.attn.o_proj.weight", (f"{block}.norm_attn_norm.attn.out_proj.weight",)),
        WeightRule("layers.{layer}.post_attn_norm.weight", (f"{block}.norm_attn_norm.norm_2.weight",)),
        WeightRule("layers.{layer}.ffn.router.weight", (f"{block}.ffn.router.layer.weight",)),
        # The experts are raw parameters without a `.weight` suffix [DBX].
        WeightRule("layers.{layer}.ffn.w13", (f"{block}.ffn.experts.mlp.w1", f"{block}.ffn.experts.mlp.v1"),
                   "dbrx_experts_w13"),
        WeightRule("layers.{layer}.ffn.w2", (f"{block}.ffn.experts.mlp.w2",), "dbrx_experts_w2"),
        WeightRule("norm.weight", ("transformer.norm_f.weight",)),
        WeightRule("lm_head.weight", ("lm_head.weight",)),
    ]


def converted_weight_rules(config: ModelConfig, names: set[str]) -> list[WeightRule]:
    """DBRX "converted" (LnL-AI/dbrx-base-converted-v2 and the AutoGPTQ checkpoints made from it [AGQ]): Wqkv split
    into q_proj/k_proj/v_proj and each expert's w1/v1/w2 an nn.Linear of its own, `ffn.experts.mlp.<e>.w1.weight`
    [ffn, hidden] (gate), `.v1.weight` [ffn, hidden] (up) and `.w2.weight` [hidden, ffn] (the fused w2's block of
    expert e, transposed, so a Linear computes `act @ W2_e`). Everything else keeps the published names."""
    check_claimed_experts(config, names)  # before any list is sized by the claim
    block, experts = "transformer.blocks.{layer}", range(config.moe_num_experts)
    mlp = f"{block}.ffn.experts.mlp"
    attn = f"{block}.norm_attn_norm.attn"
    split = {
        "layers.{layer}.attn.qkv_proj.weight": WeightRule(
            "layers.{layer}.attn.qkv_proj.weight", tuple(f"{attn}.{p}_proj.weight" for p in "qkv"), "concat_rows"),
        "layers.{layer}.ffn.w13": WeightRule(  # per expert: gate (w1) then up (v1)
            "layers.{layer}.ffn.w13", tuple(f"{mlp}.{e}.{w}.weight" for e in experts for w in ("w1", "v1")),
            "stack_expert_pairs"),
        "layers.{layer}.ffn.w2": WeightRule(
            "layers.{layer}.ffn.w2", tuple(f"{mlp}.{e}.w2.weight" for e in experts), "stack_experts"),
    }
    return [split.get(rule.kiln, rule) for rule in weight_rules(config)]


def check_claimed_experts(config: ModelConfig, names: set[str]) -> None:
    """Refuse a config.json that claims more experts than the converted layout's tensors hold, before the weight map
    lists every claimed expert's names (thousands per layer for an edited count) only to report them missing."""
    pattern = re.compile(r"\.ffn\.experts\.mlp\.(\d+)\.")
    held = 1 + max((int(m.group(1)) for m in map(pattern.search, names) if m), default=-1)
    if config.moe_num_experts > held:
        raise ConfigError(f"config.json claims {config.moe_num_experts} experts (ffn_config.moe_num_experts), but the "
                          f"checkpoint's tensors hold experts 0..{held - 1}; fix the count in config.json")


def _preset(d_model: int, n_heads: int, n_layers: int, kv_heads: int, ffn: int, experts: int, top_k: int,
            vocab: int, max_seq_len: int) -> dict[str, Any]:
    return {
        "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "torch_dtype": "bfloat16",
        "d_model": d_model, "n_heads": n_heads, "n_layers": n_layers, "max_seq_len": max_seq_len,
        "vocab_size": vocab, "tie_word_embeddings": False,
        "attn_config": {"clip_qkv": 8, "kv_n_heads": kv_heads, "rope_theta": 500000},
        "ffn_config": {"ffn_hidden_size": ffn, "moe_num_experts": experts, "moe_top_k": top_k,
                       "moe_normalize_expert_weights": 1, "ffn_act_fn": {"name": "silu"}},
    }


PRESETS = {
    # databricks/dbrx-instruct config.json [DBX]
    "dbrx": _preset(6144, 48, 40, 8, 10752, 16, 4, 100352, 32768),
    # Same structure at toy size, for demos and tests on a CPU.
    "dbrx-tiny": _preset(64, 4, 2, 2, 96, 4, 2, 512, 2048),
}

FAMILY = Family(
    name="dbrx",
    architectures=("DbrxForCausalLM",),
    model_class=DbrxForCausalLM,
    config_from_hf=config_from_hf,
    weight_rules=weight_rules,
    presets=PRESETS,
    # Recognised by its split attention: a q_proj tensor (float `.weight` or AutoGPTQ's `.qweight`).
    layouts=(WeightLayout("converted", r"\.norm_attn_norm\.attn\.q_proj\.", converted_weight_rules),),
)
