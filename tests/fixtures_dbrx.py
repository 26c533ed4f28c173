"""Tiny random DBRX checkpoints in the published layout, and the transformers model they came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import DbrxConfig, DbrxForCausalLM


def dbrx_published_config(**over: Any) -> dict[str, Any]:
    """A config.json as databricks/dbrx-instruct writes it (nested attn/ffn configs, theta inside attn_config),
    at toy size."""
    cfg = {
        "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "torch_dtype": "float32",
        "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256, "vocab_size": 300,
        "resid_pdrop": 0.0, "emb_pdrop": 0.0, "tie_word_embeddings": False, "initializer_range": 0.05,
        "attn_config": {"clip_qkv": 0.4, "kv_n_heads": 2, "rope_theta": 500000, "attn_pdrop": 0.0},
        "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2, "moe_jitter_eps": 0,
                       "moe_loss_weight": 0.05, "ffn_act_fn": {"name": "silu"}},
    }
    for key, value in over.items():
        if key in ("attn_config", "ffn_config"):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def hf_dbrx_model(cfg: dict[str, Any], seed: int = 0) -> DbrxForCausalLM:
    """transformers' DBRX for `cfg`, with the RoPE theta it would otherwise drop (model-facts.md §1 (a))."""
    torch.manual_seed(seed)
    hf_cfg = DbrxConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")},
                        rope_parameters={"rope_type": "default", "rope_theta": cfg["attn_config"]["rope_theta"]})
    hf_cfg._attn_implementation = "eager"
    model = DbrxForCausalLM(hf_cfg).eval()
    # Random weights with enough spread that greedy choices are not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, cfg["initializer_range"] * (3.0 if "wte" in name or "lm_head" in name else 1.0))
    return model


def save_published(model: torch.nn.Module, cfg: dict[str, Any], out: Path, shards: int = 3,
                   fmt: str = "safetensors") -> Path:
    """Write `model` as the published repo does: the original config.json and sharded weights with an index."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    if fmt == "bin":
        torch.save(state, out / "pytorch_model.bin")
        return out
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def make_dbrx_checkpoint(tmp: Path, seed: int = 0, **over: Any) -> tuple[Path, DbrxForCausalLM, dict[str, Any]]:
    cfg = dbrx_published_config(**over)
    model = hf_dbrx_model(cfg, seed)
    return save_published(model, cfg, tmp / "hf_dbrx"), model, cfg


def hf_scorers(model: torch.nn.Module, steps: int = 6) -> tuple[Any, Any]:
    """(logits, greedy) of a transformers causal LM: a prompt's logits [len, vocab], and its `steps` greedy tokens."""
    def logits(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([prompt])).logits[0]

    def greedy(prompt: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return logits, greedy
