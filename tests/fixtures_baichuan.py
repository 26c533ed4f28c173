"""Tiny random Baichuan checkpoints in the published layouts, and an independent plain-torch reference model.

The reference follows the published modeling files (baichuan-inc/Baichuan-7B models/modeling_baichuan.py for v1 7B;
the Baichuan-13B / Baichuan2 files for the others) line by line in meaning: W_pack unflattened as (3, hidden), NeoX
rotate_half RoPE with theta 10000 for the 7B models, the absolute ALiBi bias `slope * key_index` of
`_gen_alibi_mask` with `_get_interleave` slopes for the 13B models, RMSNorm, SwiGLU, and Baichuan2's NormHead
(rows L2-normalised when the head is applied). It imports nothing from kiln and runs in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

VERSIONS = ("v1_7b", "v1_13b", "v2_7b", "v2_13b")


def baichuan_published_config(version: str, **over: Any) -> dict[str, Any]:
    """config.json as each published repo writes it (architecture spelling, length field, auto_map), at toy size:
    the 7B versions with 4 heads of 16, the 13B (ALiBi) versions with 6 heads of 8 (not a power of two)."""
    rope = version.endswith("7b")
    v1_7b = version == "v1_7b"
    arch = "BaiChuanForCausalLM" if v1_7b else "BaichuanForCausalLM"
    module_cfg = "configuration_baichuan.BaiChuanConfig" if v1_7b else "configuration_baichuan.BaichuanConfig"
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "auto_map": {"AutoConfig": module_cfg, "AutoModelForCausalLM": f"modeling_baichuan.{arch}"},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "hidden_size": 64 if rope else 48, "num_attention_heads": 4 if rope else 6, "num_hidden_layers": 2,
        "intermediate_size": 96, "initializer_range": 0.02, "model_type": "baichuan", "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "torch_dtype": "float32" if v1_7b else "bfloat16", "use_cache": True,
        "vocab_size": 300, "transformers_version": "4.29.1" if v1_7b else "4.29.2",
    }
    if v1_7b or version == "v2_7b":
        cfg["max_position_embeddings"] = 256
    if not v1_7b:
        cfg["model_max_length"] = 256
        cfg["gradient_checkpointing"] = False
    if version.startswith("v2"):
        cfg["z_loss_weight"] = 0
        cfg["tokenizer_class"] = "BaichuanTokenizer"
    cfg.update(over)
    return cfg


def random_state(cfg: dict[str, Any], version: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights under the published tensor names, with enough spread that greedy choices are not near-ties.
    Baichuan-7B's checkpoint also carries each layer's rotary inv_freq buffer (persistent in its modeling file)."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(h, std=0.2)

    state = {"model.embed_tokens.weight": normal(vocab, h, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = norm_weight()
        state[p + "self_attn.W_pack.weight"] = normal(3 * h, h, std=0.15)
        state[p + "self_attn.o_proj.weight"] = normal(h, h, std=0.1)
        state[p + "post_attention_layernorm.weight"] = norm_weight()
        state[p + "mlp.gate_proj.weight"] = normal(inter, h, std=0.1)
        state[p + "mlp.up_proj.weight"] = normal(inter, h, std=0.1)
        state[p + "mlp.down_proj.weight"] = normal(h, inter, std=0.1)
        if version == "v1_7b":
            head_dim = h // cfg["num_attention_heads"]
            state[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (
                10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    state["model.norm.weight"] = norm_weight()
    # NormHead checkpoints hold the raw (unnormalised) rows; their norms vary so that normalising matters.
    state["lm_head.weight"] = normal(vocab, h, std=0.15) * (0.5 + torch.rand(vocab, 1, generator=gen))
    return state


def save_published(state: dict[str, torch.Tensor], cfg: dict[str, Any], out: Path, fmt: str = "safetensors",
                   shards: int = 2) -> Path:
    """Write config.json and the weights as a published repo does: one file, or shards with an index."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(state)
    if shards == 1:
        if fmt == "bin":
            torch.save(state, out / "pytorch_model.bin")
        else:
            save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        part = {n: state[n].contiguous() for n in names[i * per:(i + 1) * per]}
        if fmt == "bin":
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, out / file)
        else:
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# The layout each published repo ships (Baichuan-7B: one pytorch_model.bin; Baichuan-13B: sharded .bin); the
# Baichuan2 ones are written as sharded safetensors here so that both readers are exercised.
LAYOUTS = {"v1_7b": ("bin", 1), "v1_13b": ("bin", 3), "v2_7b": ("safetensors", 2), "v2_13b": ("safetensors", 3)}


def make_baichuan_checkpoint(tmp: Path, version: str, seed: int = 0, **over: Any) -> tuple[
        Path, dict[str, torch.Tensor], dict[str, Any]]:
    cfg = baichuan_published_config(version, **over)
    state = random_state(cfg, version, seed)
    fmt, shards = LAYOUTS[version]
    return save_published(state, cfg, tmp / f"hf_baichuan_{version}", fmt, shards), state, cfg


def interleave_slopes(n: int) -> list[float]:
    """ALiBi slopes as Baichuan's `_get_interleave` (Press et al.) defines them: start^i with start = 2^(-8/n) for
    a power of two n; otherwise the slopes of the largest power of two below n, then every other slope of twice
    that, for the remaining heads."""
    def power_of_two(m: int) -> list[float]:
        start = 2.0 ** (-8.0 / m)
        return [start ** (i + 1) for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    low = 2 ** math.floor(math.log2(n))
    return power_of_two(low) + interleave_slopes(2 * low)[0::2][: n - low]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BaichuanReference:
    """The published Baichuan forward pass in plain torch (no KV cache: every call recomputes the whole sequence).
    `round_to` first rounds the weights to a dtype (e.g. bfloat16) so that a low-precision engine can be compared
    with exact arithmetic on the same weights."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: dict[str, Any], version: str,
                 dtype: torch.dtype = torch.float64, round_to: torch.dtype | None = None) -> None:
        self.w = {k: (v.to(round_to) if round_to else v).to(dtype) for k, v in state.items()}
        self.cfg, self.dtype = cfg, dtype
        self.heads = cfg["num_attention_heads"]
        self.hidden = cfg["hidden_size"]
        self.head_dim = self.hidden // self.heads
        self.eps = cfg["rms_norm_eps"]
        self.rope = version.endswith("7b")
        self.norm_head = version.startswith("v2")

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _mask(self, n: int) -> torch.Tensor:  # [heads or 1, n, n]: causal -inf, plus the ALiBi bias slope * j
        causal = torch.triu(torch.full((n, n), float("-inf"), dtype=self.dtype), 1)[None]
        if self.rope:
            return causal
        slopes = torch.tensor(interleave_slopes(self.heads), dtype=self.dtype)
        return causal + slopes[:, None, None] * torch.arange(n, dtype=self.dtype)[None, None, :]

    def _rotary(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:  # [n, head_dim] each
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, dtype=self.dtype) / self.head_dim))
        freqs = torch.outer(torch.arange(n, dtype=self.dtype), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _attention(self, x: torch.Tensor, p: str, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (x @ self.w[p + "self_attn.W_pack.weight"].T).unflatten(-1, (3, self.hidden)).unbind(1)
        q, k, v = (t.view(n, self.heads, self.head_dim).transpose(0, 1) for t in (q, k, v))  # [heads, n, hd]
        if self.rope:
            cos, sin = self._rotary(n)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scores = q @ k.transpose(1, 2) / math.sqrt(self.head_dim) + mask
        out = torch.softmax(scores, dim=-1) @ v  # [heads, n, hd]
        return out.transpose(0, 1).reshape(n, self.hidden) @ self.w[p + "self_attn.o_proj.weight"].T

    def _mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        gate = x @ self.w[p + "mlp.gate_proj.weight"].T
        up = x @ self.w[p + "mlp.up_proj.weight"].T
        return (F.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].T

    @torch.no_grad()
    def logits(self, ids: list[int], last_only: bool = False) -> torch.Tensor:  # [len(ids) or 1, vocab]
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        mask = self._mask(len(ids))
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = x + self._attention(self._rms(x, self.w[p + "input_layernorm.weight"]), p, mask)
            x = x + self._mlp(self._rms(x, self.w[p + "post_attention_layernorm.weight"]), p)
        head = self.w["lm_head.weight"]
        if self.norm_head:
            head = F.normalize(head, dim=1)
        if last_only:
            x = x[-1:]
        return self._rms(x, self.w["model.norm.weight"]) @ head.T

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        out: list[int] = []
        for _ in range(steps):
            out.append(int(self.logits(list(ids) + out, last_only=True)[-1].argmax()))
        return out
