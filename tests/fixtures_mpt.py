"""Tiny random MPT checkpoints in the published layout, transformers' MptForCausalLM, and an independent plain-torch
reference of MPT written from llm-foundry's architecture (for the features transformers lacks).

The published layout: the original config.json with a nested attn_config, sharded safetensors with an index, and no
`lm_head` tensor (the head is tied to `transformer.wte`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# The keys transformers' MptAttentionConfig knows; the others (kv_n_heads, ...) only llm-foundry reads.
TF_ATTN_KEYS = ("attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "softmax_scale", "prefix_lm", "qk_ln",
                "attn_uses_sequence_id", "alibi", "alibi_bias_max")


def mpt_published_config(**over: Any) -> dict[str, Any]:
    """A config.json as mosaicml/mpt-7b writes it (remote-code spelling, every attn_config key spelled out), at toy
    size, with 6 heads (not a power of two). `attn_config` overrides merge into the nested dict."""
    cfg: dict[str, Any] = {
        "architectures": ["MPTForCausalLM"], "model_type": "mpt", "torch_dtype": "float32",
        "d_model": 48, "n_heads": 6, "n_layers": 2, "expansion_ratio": 4, "max_seq_len": 256, "vocab_size": 300,
        "no_bias": True, "norm_type": "low_precision_layernorm", "learned_pos_emb": True, "logit_scale": None,
        "emb_pdrop": 0, "resid_pdrop": 0, "embedding_fraction": 1.0, "init_device": "cpu", "use_cache": False,
        "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                        "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
        "init_config": {"name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu",
                        "init_div_is_residual": True, "emb_init_std": None, "emb_init_uniform_lim": None,
                        "init_std": None, "init_gain": 0.0},
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if key == "attn_config" else value
    return cfg


def _spread(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random values with enough spread that greedy choices are not near-ties; norm weights around 1."""
    if p.dim() == 1:
        base = 1.0 if name.endswith(".weight") else 0.0
        return base + 0.1 * torch.randn(p.shape, generator=gen)
    return torch.randn(p.shape, generator=gen) * (0.15 if "wte" in name or "lm_head" in name else 0.06)


def hf_mpt_model(cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """transformers' MptForCausalLM for `cfg` (eager attention, fp32), with random weights."""
    from transformers import MptConfig, MptForCausalLM

    attn = {k: v for k, v in cfg["attn_config"].items() if k in TF_ATTN_KEYS}
    skip = ("architectures", "torch_dtype", "attn_config", "init_config", "tokenizer_name")
    hf_cfg = MptConfig(attn_config=attn, **{k: v for k, v in cfg.items() if k not in skip})
    hf_cfg._attn_implementation = "eager"
    model = MptForCausalLM(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_spread(name, p, gen))
    return model


def published_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as the published checkpoints hold them: without the tied `lm_head`."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def save_checkpoint(state: dict[str, torch.Tensor], cfg: dict[str, Any], out: Path, shards: int = 2,
                    fmt: str = "safetensors") -> Path:
    """Write config.json and the tensors, sharded with an index as the published repos are (mpt-7b and mpt-30b ship
    `pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json`: fmt "bin"), or in one file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    bin_fmt = fmt == "bin"

    def write(part: dict[str, torch.Tensor], file: str) -> None:
        if bin_fmt:
            torch.save(part, out / file)
        else:
            save_file(part, str(out / file), metadata={"format": "pt"})

    if shards == 1:
        write(state, "pytorch_model.bin" if bin_fmt else "model.safetensors")
        return out
    names, weight_map = list(state), {}
    per = -(-len(names) // shards)
    for i in range(shards):
        file = f"{'pytorch_model' if bin_fmt else 'model'}-{i + 1:05d}-of-{shards:05d}.{fmt}"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        write(part, file)
        weight_map.update({n: file for n in part})
    index = "pytorch_model.bin.index.json" if bin_fmt else "model.safetensors.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# ---- The independent reference, from llm-foundry's MPT (modeling_mpt.py, blocks.py, attention.py, norm.py) ----

def _kv_heads(cfg: dict[str, Any]) -> int:
    attn = cfg["attn_config"]
    kind = attn.get("attn_type", "multihead_attention")
    return {"multihead_attention": cfg["n_heads"], "multiquery_attention": 1}.get(kind, attn.get("kv_n_heads"))


def _ffn(cfg: dict[str, Any]) -> int:
    return int(cfg["d_model"] * cfg.get("expansion_ratio", 4))


def reference_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor an llm-foundry MPT of `cfg` holds, by name, with its shape."""
    d, hd, kv, ffn = cfg["d_model"], cfg["d_model"] // cfg["n_heads"], _kv_heads(cfg), _ffn(cfg)
    bias = not cfg.get("no_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (cfg["vocab_size"], d)}
    linears = {"attn.Wqkv": (d + 2 * kv * hd, d), "attn.out_proj": (d, d), "ffn.up_proj": (ffn, d),
               "ffn.down_proj": (d, ffn)}
    norms = {"norm_1": d, "norm_2": d}
    if cfg["attn_config"].get("qk_ln"):
        norms.update({"attn.q_ln": d, "attn.k_ln": kv * hd})
    for i in range(cfg["n_layers"]):
        for name, shape in linears.items():
            shapes[f"transformer.blocks.{i}.{name}.weight"] = shape
            if bias:
                shapes[f"transformer.blocks.{i}.{name}.bias"] = (shape[0],)
        for name, dim in norms.items():
            shapes[f"transformer.blocks.{i}.{name}.weight"] = (dim,)
            if bias:
                shapes[f"transformer.blocks.{i}.{name}.bias"] = (dim,)
    shapes["transformer.norm_f.weight"] = (d,)
    if bias:
        shapes["transformer.norm_f.bias"] = (d,)
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    return shapes


def random_state(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: _spread(name, torch.empty(shape), gen) for name, shape in reference_shapes(cfg).items()}


def _alibi_slopes(n_heads: int, bias_max: float) -> torch.Tensor:  # [heads], llm-foundry gen_slopes
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 2.0 ** (-torch.arange(1, n + 1, dtype=torch.float64) * (bias_max / n))
    return torch.cat([slopes[1::2], slopes[::2]])[:n_heads] if n != n_heads else slopes


def reference_logits(state: dict[str, torch.Tensor], cfg: dict[str, Any], ids: list[int]) -> torch.Tensor:
    """[tokens, vocab] float64 logits of MPT over one whole sequence (no cache), as llm-foundry computes them."""
    sd = {k: v.double() for k, v in state.items()}
    attn, d, heads = cfg["attn_config"], cfg["d_model"], cfg["n_heads"]
    kv, hd, T = _kv_heads(cfg), d // heads, len(ids)
    bias = not cfg.get("no_bias", False)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None)

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"] if bias else None, 1e-5)

    # ALiBi as llm-foundry materialises it: slope * (j - (T - 1)) for every query, plus the causal mask.
    alibi = _alibi_slopes(heads, attn.get("alibi_bias_max", 8))[:, None, None] * torch.arange(1 - T, 1).double()
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scale = attn.get("softmax_scale") or 1 / math.sqrt(hd)
    x = sd["transformer.wte.weight"][torch.tensor(ids)]  # [T, d]
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        qkv = lin(ln(x, p + "norm_1"), p + "attn.Wqkv")
        if attn.get("clip_qkv"):
            qkv = qkv.clamp(-attn["clip_qkv"], attn["clip_qkv"])
        q, k, v = qkv.split([d, kv * hd, kv * hd], dim=-1)
        if attn.get("qk_ln"):
            q, k = ln(q, p + "attn.q_ln"), ln(k, p + "attn.k_ln")
        q = q.view(T, heads, hd).transpose(0, 1)  # [heads, T, hd]
        k = k.view(T, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
        v = v.view(T, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
        scores = (q @ k.transpose(1, 2)) * scale + alibi
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        x = x + lin((probs @ v).transpose(0, 1).reshape(T, d), p + "attn.out_proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm_2"), p + "ffn.up_proj")), p + "ffn.down_proj")
    x = ln(x, "transformer.norm_f")
    head = sd["transformer.wte.weight"] if cfg.get("tie_word_embeddings", True) else sd["lm_head.weight"]
    logits = x @ head.T
    scale_out = cfg.get("logit_scale")
    if scale_out is not None:
        logits = logits * (1 / math.sqrt(d) if scale_out == "inv_sqrt_d_model" else scale_out)
    return logits


def reference_greedy(state: dict[str, torch.Tensor], cfg: dict[str, Any], prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(reference_logits(state, cfg, ids)[-1].argmax()))
    return ids[len(prompt):]
