"""The three reference models as plain PyTorch modules for training, with the published tensor names.

Each module's `state_dict()` is exactly the tensor set of its family's published checkpoint (DBRX: dbrx-instruct's
fused `experts.mlp.w1/v1/w2`; MPT: mpt-7b's, without the tied head; Baichuan: Baichuan2-13B's `W_pack` and raw
NormHead rows), so the trained weights are saved without any renaming. The forward passes follow transformers'
DBRX and MPT and the published Baichuan2-13B modeling file; tests/test_reference_training.py checks them against
transformers and against the independent Baichuan reference of the tests. Training-only choices: attention
through `scaled_dot_product_attention`, and DBRX's experts evaluated densely (every expert on every token,
weighted by the sparse top-k gates), which gives the same output as routing and is faster at these sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ReferenceSpec:
    """The shape of one reference model; `hf_config()` in export.py turns it into the published config.json."""
    family: str
    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    ffn: int  # MPT: 4 x d_model (fixed by the architecture); Baichuan: intermediate_size; DBRX: per expert
    max_seq_len: int
    kv_heads: int = 0
    experts: int = 0
    top_k: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


SPECS = {
    # DBRX: 16 experts choose 4, GQA 4:2, RoPE theta 500000, clip_qkv 8 as dbrx-instruct; the 100k vocabulary of
    # cl100k_base (padded to 100352 as published) dominates the size, so the width stays at 64.
    "dbrx": ReferenceSpec("dbrx", 100352, 64, 4, 4, 128, 2048, kv_heads=2, experts=16, top_k=4,
                          extra={"clip_qkv": 8.0, "rope_theta": 500000.0, "moe_loss_weight": 0.05}),
    # MPT: ALiBi with 6 heads (not a power of two, as MPT-30B's 56), no biases, tied embeddings, GELU 4x.
    "mpt": ReferenceSpec("mpt", 50432, 144, 6, 6, 576, 2048, extra={"alibi_bias_max": 8}),
    # Baichuan2-13B style: ALiBi with 6 heads, W_pack, RMSNorm, SwiGLU, NormHead; its own 16k SentencePiece.
    "baichuan": ReferenceSpec("baichuan", 16000, 192, 6, 6, 512, 2048),
}


def mpt_alibi_slopes(n_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """MPT's slopes (transformers' build_mpt_alibi_tensor): for a head count that is not a power of two, the odd
    then the even slopes of the next power of two, cut to n_heads."""
    pow2 = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / torch.pow(2.0, torch.arange(1, pow2 + 1, dtype=torch.float64) * (bias_max / pow2))
    if pow2 != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def baichuan_alibi_slopes(n_heads: int) -> torch.Tensor:
    """Baichuan-13B's `_get_interleave` slopes (Press et al.): those of the largest power of two below n, then every
    other slope of twice that."""
    def power_of_two(m: int) -> list[float]:
        start = 2.0 ** (-8.0 / m)
        return [start ** (i + 1) for i in range(m)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads), dtype=torch.float64)
    low = 2 ** math.floor(math.log2(n_heads))
    rest = baichuan_alibi_slopes(2 * low)[0::2][: n_heads - low]
    return torch.cat([torch.tensor(power_of_two(low), dtype=torch.float64), rest])


def alibi_causal_bias(slopes: torch.Tensor, n: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """[heads, n, n]: slope * (j - i) on and below the diagonal, -inf above. Per query row this differs from MPT's
    slope * (j - (n - 1)) and Baichuan's slope * j by a constant, which softmax ignores."""
    pos = torch.arange(n, device=device)
    rel = (pos[None, :] - pos[:, None]).to(torch.float32)  # [n, n]
    bias = slopes.to(device=device, dtype=torch.float32)[:, None, None] * rel
    return bias.masked_fill(rel > 0, float("-inf")).to(dtype)


def rope_cos_sin(n: int, head_dim: int, theta: float, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [n, head_dim], NeoX rotate_half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x [b, h, n, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q [b, h, n, hd], k/v [b, kv, n, hd] -> [b, n, h * hd]; causal (bias carries ALiBi and the mask)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if bias is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].to(q.dtype))
    return out.transpose(1, 2).flatten(2)


def packed_attention(qkv: nn.Linear, out: nn.Linear, x: torch.Tensor, heads: int, bias: torch.Tensor) -> torch.Tensor:
    """Multi-head attention whose q, k, v come from one packed projection (MPT's Wqkv, Baichuan's W_pack): rows
    [q; k; v], heads contiguous in each. x [b, n, d] -> [b, n, d]."""
    b, n, _ = x.shape
    q, k, v = qkv(x).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # each [b, heads, n, head_dim]
    return out(attend(q, k, v, bias))


class _Norm(nn.Module):
    """LayerNorm without bias (DBRX, MPT `no_bias`), registered under `weight` only."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), None, self.eps).to(x.dtype)


class _RMSNorm(_Norm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


def _module(**children: nn.Module) -> nn.Module:
    """An empty module holding `children`: the nesting that gives the published tensor names."""
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


class _DbrxExperts(nn.Module):
    """`ffn.experts.mlp.{w1,v1,w2}`, each [experts * ffn, d] as dbrx-instruct stores them."""

    def __init__(self, s: ReferenceSpec) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(s.experts * s.ffn, s.d_model))
        self.v1 = nn.Parameter(torch.empty(s.experts * s.ffn, s.d_model))
        self.w2 = nn.Parameter(torch.empty(s.experts * s.ffn, s.d_model))


class DbrxTrain(nn.Module):
    """DBRX as transformers' DbrxForCausalLM computes it (the RoPE theta of attn_config honoured)."""

    def __init__(self, s: ReferenceSpec) -> None:
        super().__init__()
        self.s, self.head_dim = s, s.d_model // s.n_heads
        qkv = s.d_model + 2 * s.kv_heads * self.head_dim
        blocks = [_module(
            norm_attn_norm=_module(norm_1=_Norm(s.d_model), norm_2=_Norm(s.d_model), attn=_module(
                Wqkv=_linear(s.d_model, qkv), out_proj=_linear(s.d_model, s.d_model))),
            ffn=_module(router=_module(layer=_linear(s.d_model, s.experts)), experts=_module(mlp=_DbrxExperts(s))),
        ) for _ in range(s.n_layers)]
        self.transformer = _module(wte=nn.Embedding(s.vocab_size, s.d_model), blocks=nn.ModuleList(blocks),
                                   norm_f=_Norm(s.d_model))
        self.lm_head = _linear(s.d_model, s.vocab_size)

    def _attention(self, attn: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        clip = self.s.extra["clip_qkv"]
        qkv = attn.Wqkv(x).clamp(-clip, clip)
        q, k, v = qkv.split([self.s.d_model, self.s.kv_heads * self.head_dim, self.s.kv_heads * self.head_dim], -1)
        q, k, v = (t.view(b, n, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return attn.out_proj(attend(q, k, v, None))

    def _moe(self, ffn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, shape = self.s, x.shape
        x = x.reshape(-1, s.d_model)  # [tokens, d]
        probs = torch.softmax(ffn.router.layer(x).float(), dim=-1)  # [tokens, experts]
        top, idx = torch.topk(probs, s.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)  # moe_normalize_expert_weights = 1 (an L1 norm)
        gates = torch.zeros_like(probs).scatter(1, idx, top).to(x.dtype)
        mlp = ffn.experts.mlp
        hidden = F.silu(x @ mlp.w1.T) * (x @ mlp.v1.T)  # [tokens, experts * ffn]: every expert, densely
        hidden = (hidden.view(-1, s.experts, s.ffn) * gates[:, :, None]).view(-1, s.experts * s.ffn)
        # Switch-style load balance: experts x sum(fraction of routed slots x mean router probability).
        routed = torch.zeros_like(probs).scatter(1, idx, 1.0).mean(0) / s.top_k
        aux = s.experts * (routed * probs.mean(0)).sum()
        return (hidden @ mlp.w2).view(shape), aux

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # ids [b, n] -> [b, n, vocab]
        t = self.transformer
        x = t.wte(ids)
        rope = rope_cos_sin(ids.shape[1], self.head_dim, self.s.extra["rope_theta"], ids.device)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in t.blocks:
            nan = block.norm_attn_norm
            h = x + self._attention(nan.attn, nan.norm_1(x), rope)
            out, block_aux = self._moe(block.ffn, nan.norm_2(h))
            x, aux = h + out, aux + block_aux
        return self.lm_head(t.norm_f(x)), aux * self.s.extra["moe_loss_weight"] / self.s.n_layers


class MptTrain(nn.Module):
    """MPT as transformers' MptForCausalLM computes it: ALiBi, no biases, GELU, head tied to `wte`."""

    def __init__(self, s: ReferenceSpec) -> None:
        super().__init__()
        self.s = s
        blocks = [_module(
            norm_1=_Norm(s.d_model), norm_2=_Norm(s.d_model),
            attn=_module(Wqkv=_linear(s.d_model, 3 * s.d_model), out_proj=_linear(s.d_model, s.d_model)),
            ffn=_module(up_proj=_linear(s.d_model, s.ffn), down_proj=_linear(s.ffn, s.d_model)),
        ) for _ in range(s.n_layers)]
        self.transformer = _module(wte=nn.Embedding(s.vocab_size, s.d_model), blocks=nn.ModuleList(blocks),
                                   norm_f=_Norm(s.d_model))
        self.register_buffer("slopes", mpt_alibi_slopes(s.n_heads, s.extra["alibi_bias_max"]).float(),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.transformer
        x = t.wte(ids)
        bias = alibi_causal_bias(self.slopes, ids.shape[1], x.dtype, ids.device)
        for block in t.blocks:
            x = x + packed_attention(block.attn.Wqkv, block.attn.out_proj, block.norm_1(x), self.s.n_heads, bias)
            x = x + block.ffn.down_proj(F.gelu(block.ffn.up_proj(block.norm_2(x))))
        return t.norm_f(x) @ t.wte.weight.T, x.new_zeros((), dtype=torch.float32)


class BaichuanTrain(nn.Module):
    """Baichuan2-13B as its published modeling file computes it: W_pack, ALiBi, RMSNorm, SwiGLU, NormHead."""

    def __init__(self, s: ReferenceSpec) -> None:
        super().__init__()
        self.s = s
        layers = [_module(
            input_layernorm=_RMSNorm(s.d_model, 1e-6), post_attention_layernorm=_RMSNorm(s.d_model, 1e-6),
            self_attn=_module(W_pack=_linear(s.d_model, 3 * s.d_model), o_proj=_linear(s.d_model, s.d_model)),
            mlp=_module(gate_proj=_linear(s.d_model, s.ffn), up_proj=_linear(s.d_model, s.ffn),
                        down_proj=_linear(s.ffn, s.d_model)),
        ) for _ in range(s.n_layers)]
        self.model = _module(embed_tokens=nn.Embedding(s.vocab_size, s.d_model), layers=nn.ModuleList(layers),
                             norm=_RMSNorm(s.d_model, 1e-6))
        self.lm_head = _linear(s.d_model, s.vocab_size)
        self.register_buffer("slopes", baichuan_alibi_slopes(s.n_heads).float(), persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.embed_tokens(ids)
        bias = alibi_causal_bias(self.slopes, ids.shape[1], x.dtype, ids.device)
        for layer in m.layers:
            attn, mlp = layer.self_attn, layer.mlp
            x = x + packed_attention(attn.W_pack, attn.o_proj, layer.input_layernorm(x), self.s.n_heads, bias)
            h = layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        head = F.normalize(self.lm_head.weight, dim=1)  # NormHead: rows normalised when applied
        return m.norm(x) @ head.T, x.new_zeros((), dtype=torch.float32)


MODELS = {"dbrx": DbrxTrain, "mpt": MptTrain, "baichuan": BaichuanTrain}


def init_weights(model: nn.Module, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), output projections scaled by 1/sqrt(2 * layers), norms at 1."""
    gen = torch.Generator().manual_seed(seed)
    layers = model.s.n_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("out_proj.weight", "o_proj.weight",
                                                                  "down_proj.weight", "mlp.w2")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build(family: str, seed: int = 0, spec: ReferenceSpec | None = None) -> nn.Module:
    model = MODELS[family](spec or SPECS[family])
    init_weights(model, seed)
    return model
