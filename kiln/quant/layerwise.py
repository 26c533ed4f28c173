"""Running the float model one decoder block at a time on calibration tokens (AWQ and GPTQ).

Only the embedding, then one block at a time, is made and filled from the convert's weight source (in float32,
tensor parallel 1: kiln's full tensors), so memory holds one block's weights plus the calibration activations
([tokens, hidden]) whatever the model size. Each block runs as a prefill of `sequences` independent sequences of
`length` tokens over a throw-away KV cache of one block of `length` slots per sequence, with the torch kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import torch
from torch import nn

from kiln.config import Mapping, ModelConfig
from kiln.kernels import REFERENCE
from kiln.layers.context import AttentionMetadata, ForwardContext
from kiln.layers.attention import Attention
from kiln.layers.embedding import VocabEmbedding
from kiln.layers.sharding import full_shape
from kiln.models.decoder import DecoderBlock


class FullTensors(Protocol):
    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor: ...


def fill(module: nn.Module, prefix: str, source: FullTensors) -> nn.Module:
    """Copy every parameter of `module` from the source's full tensor `<prefix><name>`."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(source.full_tensor(prefix + name, full_shape(param)).to(param.dtype))
    return module


@dataclasses.dataclass
class Activations:
    """The residual stream between blocks: the previous block's branch output and the residual before it (the
    first block gets the embedding and None), each [sequences * length, hidden]."""

    hidden: torch.Tensor
    residual: torch.Tensor | None


class LayerwiseModel:
    """The float32, tp 1 model of a convert plan, materialised a block at a time."""

    def __init__(self, config: ModelConfig, source: FullTensors, tokens: torch.Tensor, chunk: int = 16) -> None:
        # tokens [sequences, length] int64: the calibration windows
        self.config = dataclasses.replace(config, dtype="float32")
        self.source, self.tokens, self.chunk = source, tokens, chunk
        self.sequences, self.length = tokens.shape

    def embed(self) -> Activations:
        embedding = fill(VocabEmbedding(self.config, Mapping()), "embed_tokens.", self.source)
        with torch.no_grad():
            return Activations(embedding(self.tokens.flatten()), None)

    def block(self, index: int) -> DecoderBlock:
        """Block `index` with its float weights (float32)."""
        return fill(DecoderBlock(self.config, Mapping()), f"layers.{index}.", self.source).eval()

    def chunks(self) -> Iterator[slice]:
        """Token ranges of `chunk` whole sequences each."""
        for start in range(0, self.sequences, self.chunk):
            stop = min(start + self.chunk, self.sequences)
            yield slice(start * self.length, stop * self.length)

    def context(self, attn: Attention, sequences: int) -> ForwardContext:
        """A prefill of `sequences` sequences of `length` tokens, each in its own cache block of `attn`'s cache."""
        n, length = sequences, self.length
        attn.k_cache = torch.zeros(n, length, attn.num_kv_heads, attn.head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n * length), query_start_loc=torch.arange(n + 1, dtype=torch.int32) * length,
            seq_lens=torch.full((n,), length, dtype=torch.int32),
            block_tables=torch.arange(n, dtype=torch.int32).unsqueeze(1), max_query_len=length, max_seq_len=length)
        return ForwardContext(REFERENCE, meta)

    def run(self, block: DecoderBlock, acts: Activations) -> Activations:
        """The block's outputs on every calibration token, computed chunk by chunk (hooks see each chunk)."""
        hidden, residual = [], []
        positions = torch.arange(self.length).repeat(self.chunk)
        with torch.no_grad():
            for part in self.chunks():
                n = (part.stop - part.start) // self.length
                res = None if acts.residual is None else acts.residual[part]
                h, r = block(positions[: part.stop - part.start], acts.hidden[part], res, self.context(block.attn, n))
                hidden.append(h)
                residual.append(r)
        block.attn.k_cache = block.attn.v_cache = torch.empty(0)
        return Activations(torch.cat(hidden), torch.cat(residual))

    def attention(self, attn: Attention, x: torch.Tensor) -> torch.Tensor | None:
        """attn's output on x [n * length, hidden] (whole windows, as they were recorded), None for a partial one."""
        n, rest = divmod(x.shape[0], self.length)
        if rest or not n:
            return None
        with torch.no_grad():
            out = attn(torch.arange(self.length).repeat(n), x, self.context(attn, n))
        attn.k_cache = attn.v_cache = torch.empty(0)
        return out
