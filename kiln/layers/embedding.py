"""Vocabulary-parallel embedding and LM head. The vocabulary is padded to a multiple of tp_size; padded rows are
zeros and their logits are cut off before anyone sees them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Mapping, ModelConfig
from kiln.distributed.collectives import tp_all_gather_last_dim, tp_all_reduce
from kiln.layers.sharding import Segment, set_shard


def _vocab_segment(vocab: int, mapping: Mapping) -> Segment:
    padded = -(-vocab // mapping.tp_size) * mapping.tp_size
    return Segment(padded, mapping.tp_size, mapping.tp_rank)


class VocabEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the rows; tokens outside it embed to zero and the all-reduce fills
    them in from the rank that owns them."""

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        seg = _vocab_segment(config.vocab_size, mapping)
        self.start = seg.index * seg.local_size
        self.weight = nn.Parameter(torch.empty(seg.local_size, config.hidden_size, dtype=config.torch_dtype),
                                   requires_grad=False)
        set_shard(self.weight, 0, seg, pad=True)
        self.tp_size = mapping.tp_size

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # [tokens] -> [tokens, hidden]
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside.unsqueeze(-1)
        return tp_all_reduce(out)


class LMHead(nn.Module):
    """Column-parallel over the vocabulary; logits are gathered and returned in float32, padding removed, times
    logit_scale when the model has one (MPT)."""

    # The projection; a GPU engine whose build found a faster decode kernel for this shape rebinds it per module.
    matmul = staticmethod(F.linear)

    def __init__(self, config: ModelConfig, mapping: Mapping) -> None:
        super().__init__()
        seg = _vocab_segment(config.vocab_size, mapping)
        self.vocab_size = config.vocab_size
        self.logit_scale = config.logit_scale
        self.weight = nn.Parameter(torch.empty(seg.local_size, config.hidden_size, dtype=config.torch_dtype),
                                   requires_grad=False)
        set_shard(self.weight, 0, seg, pad=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [rows, hidden] -> [rows, vocab] float32
        logits = tp_all_gather_last_dim(self.matmul(hidden, self.weight, None))[:, : self.vocab_size].float()
        return logits if self.logit_scale is None else logits * self.logit_scale
