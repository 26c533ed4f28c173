"""Baichuan (baichuan-inc/Baichuan-7B, Baichuan-13B-Base/Chat, Baichuan2-7B/13B-Base/Chat): pre-norm RMSNorm decoder,
fused W_pack [Q; K; V] without GQA, SwiGLU MLP, untied LM head; the 7B models use NeoX RoPE (theta 10000), the 13B
models ALiBi; Baichuan2 L2-normalises the LM head rows (NormHead).

Facts from the published modeling files [BC7] (Baichuan-7B) and [BC2] (Baichuan2-13B; Baichuan-13B's is the same
without NormHead), vLLM's loader [VL] and TensorRT-LLM's examples [TRT]; see docs/model-facts.md §3-§4 and
docs/models/baichuan.md. The four versions share one architecture and differ by two switches (position encoding and
NormHead), which the published config.json files do not state: they are recognised by architecture name, hidden size
and vocabulary as vLLM does, and `kiln convert --model_version` (TensorRT-LLM's flag) states them for other sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.config import ConfigError, ModelConfig
from kiln.models.decoder import DecoderForCausalLM
from kiln.models.family import Family, WeightRule, hf_dtype

ROPE, ALIBI = "rope_gpt_neox", "alibi"


@dataclass(frozen=True)
class BaichuanVersion:
    """One of TensorRT-LLM's `--model_version` values: which generation (2 has NormHead) and position encoding."""

    name: str
    generation: int
    position: str


VERSIONS = {v.name: v for v in (
    BaichuanVersion("v1_7b", 1, ROPE),
    BaichuanVersion("v1_13b", 1, ALIBI),
    BaichuanVersion("v2_7b", 2, ROPE),
    BaichuanVersion("v2_13b", 2, ALIBI),
)}

# The published shapes that identify a version [VL baichuan.py; model-facts.md §3].
ROPE_HIDDEN, ALIBI_HIDDEN = 4096, 5120
V1_VOCAB, V2_VOCAB = 64000, 125696
DEFAULT_LENGTH = 4096  # BaiChuanConfig.max_position_embeddings / BaichuanConfig.model_max_length defaults [BC7][BC2]
ROPE_THETA = 10000.0  # hard-coded in both RoPE modeling files; config.json carries no theta [BC7]


class BaichuanForCausalLM(DecoderForCausalLM):
    """Baichuan v1/v2, 7B/13B: RMSNorm (fp32 variance), W_pack QKV, RoPE or ALiBi, SwiGLU, untied (Norm)Head."""


def _facts(hf: dict[str, Any]) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """What config.json alone says: {"generation" | "position": (value, reason)}, and what it leaves open."""
    arch = (hf.get("architectures") or [""])[0]
    if arch == "BaiChuanForCausalLM":
        # Only Baichuan-7B's modeling file has this spelling: RoPE and a plain Linear head [BC7].
        why = "architecture BaiChuanForCausalLM (Baichuan-7B)"
        return {"generation": (1, why), "position": (ROPE, why)}, []
    facts: dict[str, tuple[Any, str]] = {}
    unknown: list[str] = []
    hidden, vocab = hf.get("hidden_size"), hf.get("vocab_size")
    if hidden == ROPE_HIDDEN:
        facts["position"] = (ROPE, f"hidden_size {hidden} (Baichuan2-7B, RoPE)")
    elif hidden == ALIBI_HIDDEN:
        facts["position"] = (ALIBI, f"hidden_size {hidden} (Baichuan-13B/Baichuan2-13B, ALiBi)")
    else:
        unknown.append(f"hidden_size {hidden} is neither {ROPE_HIDDEN} (7B, RoPE) nor {ALIBI_HIDDEN} (13B, ALiBi)")
    if vocab == V2_VOCAB:
        facts["generation"] = (2, f"vocab_size {vocab} (Baichuan2, NormHead)")
    elif vocab == V1_VOCAB:
        facts["generation"] = (1, f"vocab_size {vocab} (Baichuan 1, plain head)")
    else:
        unknown.append(f"vocab_size {vocab} is neither {V1_VOCAB} (Baichuan 1) nor {V2_VOCAB} (Baichuan2)")
    return facts, unknown


def _stated_version(hf: dict[str, Any], model_version: str | None) -> str | None:
    """The version the user states: --model_version, or `kiln_model_version` in the config (kiln's tiny presets)."""
    in_config = hf.get("kiln_model_version")
    for name, value in (("--model_version", model_version), ("kiln_model_version", in_config)):
        if value is not None and value not in VERSIONS:
            raise ConfigError(f"{name} {value!r} is not a Baichuan version; choose one of {', '.join(VERSIONS)}")
    if model_version and in_config and model_version != in_config:
        raise ConfigError(f"--model_version {model_version} contradicts kiln_model_version {in_config} in the "
                          "config; drop one of them")
    return model_version or in_config


def resolve_version(hf: dict[str, Any], model_version: str | None = None) -> BaichuanVersion:
    """The Baichuan version of a config: recognised from the published shapes, or stated, never guessed. A stated
    version that contradicts what the config shows is an error (running it would be silently wrong)."""
    facts, unknown = _facts(hf)
    stated = _stated_version(hf, model_version)
    if stated is None:
        if unknown:
            raise ConfigError(
                "cannot tell which Baichuan this is: " + "; ".join(unknown)
                + f". State it with --model_version {{{','.join(VERSIONS)}}} (v1/v2 = Baichuan/Baichuan2, "
                "7b = RoPE, 13b = ALiBi)")
        return next(v for v in VERSIONS.values()
                    if (v.generation, v.position) == (facts["generation"][0], facts["position"][0]))
    version = VERSIONS[stated]
    for key, got in (("generation", version.generation), ("position", version.position)):
        if key in facts and facts[key][0] != got:
            said = {"generation": f"Baichuan{'2' if got == 2 else ' 1'}", "position": "ALiBi" if got == ALIBI
                    else "RoPE"}[key]
            raise ConfigError(f"--model_version {stated} means {said}, but config.json has {facts[key][1]}; "
                              "drop --model_version to use what the config shows, or fix config.json")
    return version


def _check_supported(hf: dict[str, Any]) -> None:
    """Refuse configs that the published modeling files would not run as kiln does (never run approximately)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"Baichuan hidden_act {act!r} is not supported; the published models use silu (SwiGLU)")
    if hf.get("tie_word_embeddings", False):
        raise ConfigError("Baichuan with tie_word_embeddings=true is not a published configuration; kiln needs the "
                          "separate lm_head.weight")
    if hf.get("rope_scaling"):
        raise ConfigError(f"Baichuan rope_scaling {hf['rope_scaling']!r} is not supported; the published models "
                          "use plain RoPE (remove rope_scaling for the original behaviour)")
    theta = hf.get("rope_theta", ROPE_THETA)
    if float(theta) != ROPE_THETA:
        raise ConfigError(f"Baichuan rope_theta {theta} is not supported: the published modeling files hard-code "
                          f"{ROPE_THETA:g} and ignore the field")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise ConfigError(f"Baichuan num_key_value_heads {hf['num_key_value_heads']} != num_attention_heads "
                          f"{heads}: W_pack is [Q; K; V] of equal size, Baichuan has no GQA")
    if hf["hidden_size"] % heads:
        raise ConfigError(f"Baichuan hidden_size {hf['hidden_size']} is not divisible by num_attention_heads {heads}")


def _length(hf: dict[str, Any], position: str) -> int:
    """Baichuan-7B names its length max_position_embeddings, the 13B models model_max_length, Baichuan2-7B both
    [model-facts.md §3]; each version's modeling file reads its own (rotary cache / ALiBi mask) first."""
    order = ("max_position_embeddings", "model_max_length") if position == ROPE else (
        "model_max_length", "max_position_embeddings")
    for key in order:
        if hf.get(key):
            return int(hf[key])
    return DEFAULT_LENGTH


def config_from_hf(hf: dict[str, Any], dtype: str | None = None, model_version: str | None = None) -> ModelConfig:
    """Read a published Baichuan config.json; `model_version` is `kiln convert --model_version`."""
    _check_supported(hf)
    version = resolve_version(hf, model_version)
    return ModelConfig(
        architecture="BaichuanForCausalLM",  # one name for all versions, as TensorRT-LLM's checkpoint has [TRT]
        family="baichuan",
        dtype=dtype or hf_dtype(hf),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        hidden_act="silu",
        max_position_embeddings=_length(hf, version.position),
        norm_type="rmsnorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        position_embedding_type=version.position,
        rotary_base=ROPE_THETA,
        alibi_bias_max=8.0,  # kiln's slopes equal Baichuan's _get_interleave at 8 (model-facts.md §4)
        norm_head=version.generation == 2,
        bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2),
        pad_token_id=hf.get("pad_token_id", 0),
    )


def weight_rules(config: ModelConfig) -> list[WeightRule]:
    layer = "model.layers.{layer}"
    return [
        WeightRule("embed_tokens.weight", ("model.embed_tokens.weight",)),
        WeightRule("layers.{layer}.input_norm.weight", (f"{layer}.input_layernorm.weight",)),
        # W_pack is unflattened as (3, hidden): rows [Q; K; V], heads contiguous in each, which is kiln's layout.
        WeightRule("layers.{layer}.attn.qkv_proj.weight", (f"{layer}.self_attn.W_pack.weight",)),
        WeightRule("layers.{layer}.attn.o_proj.weight", (f"{layer}.self_attn.o_proj.weight",)),
        WeightRule("layers.{layer}.post_attn_norm.weight", (f"{layer}.post_attention_layernorm.weight",)),
        WeightRule("layers.{layer}.ffn.gate_up_proj.weight",
                   (f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"), "concat_rows"),
        WeightRule("layers.{layer}.ffn.down_proj.weight", (f"{layer}.mlp.down_proj.weight",)),
        WeightRule("norm.weight", ("model.norm.weight",)),
        # NormHead normalises the rows on its first inference call [BC2]; kiln does it once, here.
        WeightRule("lm_head.weight", ("lm_head.weight",), "l2_normalize_rows" if config.norm_head else "identity"),
    ]


def _preset(arch: str, hidden: int, heads: int, layers: int, inter: int, vocab: int, length_keys: tuple[str, ...],
            dtype: str = "bfloat16", version: str | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [arch], "model_type": "baichuan", "torch_dtype": dtype,
        "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers,
        "intermediate_size": inter, "vocab_size": vocab, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        **{key: 4096 for key in length_keys},
    }
    if vocab == V2_VOCAB or (version or "").startswith("v2"):
        cfg["z_loss_weight"] = 0
    if version is not None:
        cfg["kiln_model_version"] = version
    return cfg


PRESETS = {
    # Published config.json shapes (model-facts.md §3); the version is recognised from them. bfloat16 throughout,
    # the dtype kiln serves them in.
    "baichuan-7b": _preset("BaiChuanForCausalLM", 4096, 32, 32, 11008, V1_VOCAB, ("max_position_embeddings",)),
    "baichuan-13b": _preset("BaichuanForCausalLM", 5120, 40, 40, 13696, V1_VOCAB, ("model_max_length",)),
    "baichuan2-7b": _preset("BaichuanForCausalLM", 4096, 32, 32, 11008, V2_VOCAB,
                            ("max_position_embeddings", "model_max_length")),
    "baichuan2-13b": _preset("BaichuanForCausalLM", 5120, 40, 40, 13696, V2_VOCAB, ("model_max_length",)),
    # Toy sizes for demos and CPU tests; they state their version because their shapes cannot show it.
    "baichuan-tiny": _preset("BaichuanForCausalLM", 48, 6, 2, 96, 512, ("model_max_length",), version="v2_13b"),
    "baichuan-tiny-rope": _preset("BaichuanForCausalLM", 64, 4, 2, 96, 512,
                                  ("max_position_embeddings", "model_max_length"), version="v2_7b"),
}

FAMILY = Family(
    name="baichuan",
    architectures=("BaichuanForCausalLM", "BaiChuanForCausalLM"),
    model_class=BaichuanForCausalLM,
    config_from_hf=config_from_hf,
    weight_rules=weight_rules,
    presets=PRESETS,
    # Baichuan-7B registers its rotary inv_freq as a persistent buffer, so its checkpoint carries one per layer [BC7].
    ignored_sources=(r"\.self_attn\.rotary_emb\.inv_freq$",),
)
