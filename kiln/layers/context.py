"""What one forward pass needs beside the tokens: where each token's KV goes and what it attends to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels import KernelSet


@dataclass
class AttentionMetadata:
    """The packed batch as the attention kernels consume it (see kiln/kernels/reference.py for the layout)."""

    slot_mapping: torch.Tensor  # [tokens] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [seqs + 1] int32: each sequence's range in the packed tokens
    seq_lens: torch.Tensor  # [seqs] int32: tokens in the cache after this step (cached + new)
    block_tables: torch.Tensor  # [seqs, max_blocks] int32
    max_query_len: int
    max_seq_len: int


@dataclass
class ForwardContext:
    """Handed down through the model on each forward: the kernels chosen at load time and the batch layout."""

    kernels: KernelSet
    attn: AttentionMetadata
