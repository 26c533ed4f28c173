"""Paged KV-cache bookkeeping: which cache blocks hold which sequence's tokens, shared where the content is the same.

The KV cache is `num_blocks` blocks of `block_size` token slots each. A sequence's `block_table[i]` holds its
positions i*block_size ... (i+1)*block_size - 1, so position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Blocks are reference counted: a block is shared by
sequences with the same prefix (prefix caching) and by forks (beam search, n > 1), and copied on write.

Prefix caching: a full block whose K/V has been computed is registered under a hash of its tokens chained with the
previous block's hash, so one hash names the whole prefix up to the end of that block. Freed blocks keep their hash
until a fresh allocation needs the block (least recently freed first), so a later request with the same prefix
reuses their K/V instead of computing it again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from kiln.engine.sequence import Sequence


def hash_block(prev_hash: bytes, tokens: list[int]) -> bytes:
    """Content hash of one full block chained with the hash of everything before it (b"" for the first block).
    SHA-256 rather than Python's hash(): a collision would silently serve another prompt's K/V."""
    return hashlib.sha256(prev_hash + array("q", tokens).tobytes()).digest()


@dataclass
class Block:
    """One KV-cache block: how many sequences use it, and its prefix hash once it is full and computed."""

    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Allocates KV-cache blocks to sequences, with prefix caching, reference counts and copy-on-write.

    The caller (the scheduler) checks `can_allocate` / `can_append` before `allocate` / `append_slots`, and calls
    `mark_computed` after each step so that newly computed full blocks become visible to other requests.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} is {value!r}; it must be an integer >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks (ref_count 0) in eviction order: the front is taken first. Hashed blocks join at the back
        # (least recently freed are evicted first); blocks without a hash hold nothing reusable and join at the front.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # prefix hash -> block id
        self.num_prefix_hit_tokens = 0  # total tokens served from the prefix cache
        self.num_prefix_query_tokens = 0  # total tokens looked up at allocation (hit rate = hits / queries)

    # ---- state -------------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by some sequence (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by prefix hash, in use or free."""
        return len(self._cached)

    def reset_prefix_cache(self) -> None:
        """Forget every prefix hash (e.g. after the weights change). Blocks in use keep their contents; their
        sequences re-register them at their next `mark_computed`."""
        self._cached.clear()
        for block in self.blocks:
            block.hash = None

    # ---- allocation ----------------------------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `allocate(seq)` would succeed now. A hit on a block in use costs no free block; a hit on a
        free cached block takes that block out of the free list, as a fresh allocation would."""
        hits = self._prefix_hits(seq)
        in_use_hits = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return _cdiv(seq.num_tokens, self.block_size) - in_use_hits <= len(self._free)

    def peek_prefix_hit_tokens(self, seq: Sequence) -> int:
        """How many leading tokens of `seq` `allocate` would take from the prefix cache now."""
        return len(self._prefix_hits(seq)) * self.block_size

    def allocate(self, seq: Sequence) -> None:
        """Give a sequence with an empty block table blocks for all of its tokens, sharing cached prefix blocks.
        Sets `num_computed_tokens` and `num_cached_tokens` to the number of tokens found in the cache."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already has blocks {seq.block_table}; free it before allocate")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free KV blocks for sequence {seq.seq_id}; check can_allocate first")
        hits = self._prefix_hits(seq)
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self._free[b]
            block.ref_count += 1
            seq.block_table.append(b)
        while len(seq.block_table) < _cdiv(seq.num_tokens, self.block_size):
            seq.block_table.append(self._take_free_block())
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self.num_prefix_hit_tokens += seq.num_cached_tokens
        self.num_prefix_query_tokens += seq.num_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `append_slots(seq, num_new_tokens)` would succeed now."""
        return self._append_cost(seq, num_new_tokens) <= len(self._free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make the block table cover `num_computed_tokens + num_new_tokens` positions, with every block that
        those tokens are written into private to `seq`. Returns the (src_block, dst_block) copies that the runner
        must make before the step: a shared block that already holds computed tokens of `seq` is copied to a
        private one (copy-on-write)."""
        if not self.can_append(seq, num_new_tokens):
            raise RuntimeError(f"not enough free KV blocks to extend sequence {seq.seq_id}; check can_append first")
        bs, table = self.block_size, seq.block_table
        end_block = _cdiv(seq.num_computed_tokens + num_new_tokens, bs)
        copies: list[tuple[int, int]] = []
        for i in range(seq.num_computed_tokens // bs, min(len(table), end_block)):
            src = self.blocks[table[i]]
            if src.ref_count > 1:
                dst = self._take_free_block()
                src.ref_count -= 1
                table[i] = dst
                if i * bs < seq.num_computed_tokens:  # holds K/V that this sequence still attends to
                    copies.append((src.block_id, dst))
        while len(table) < end_block:
            table.append(self._take_free_block())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of `parent`'s blocks with `child` (which must have no blocks and the same tokens so far);
        the first write to a shared block by either is copied on write by `append_slots`."""
        if child.block_table:
            raise ValueError(f"fork: child sequence {child.seq_id} already has blocks; give it an empty table")
        n = parent.num_computed_tokens
        if child.token_ids[:n] != parent.token_ids[:n]:
            raise ValueError(
                f"fork: child sequence {child.seq_id} does not start with the {n} computed tokens of parent "
                f"{parent.seq_id}; create it with parent.fork(new_id)"
            )
        for b in parent.block_table:
            self.blocks[b].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (last block first, so that a prefix outlives its tail in the cache)."""
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            if block.ref_count < 1:
                raise RuntimeError(f"block {b} of sequence {seq.seq_id} is already free (double free)")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[b] = None
                if block.hash is None:
                    self._free.move_to_end(b, last=False)
        seq.block_table = []

    # ---- prefix cache --------------------------------------------------------------------------------------------

    def mark_computed(self, seq: Sequence) -> None:
        """Register the newly full blocks of `seq` whose K/V is now computed, so that later allocations can share
        them. Only computed blocks: a block merely allocated this step is being written by this very step."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        # Hashed blocks form a prefix of the table; walk back from the newest full block to where hashing stopped.
        start = num_full
        while start > 0 and self.blocks[seq.block_table[start - 1]].hash is None:
            start -= 1
        hashes = self._seq_hashes(seq, num_full)
        for i in range(start, num_full):
            block = self.blocks[seq.block_table[i]]
            block.hash = hashes[i]
            # Two sequences may compute the same prefix in the same step; the first registered block serves hits.
            self._cached.setdefault(hashes[i], block.block_id)

    def _seq_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chained hashes of the first `num_blocks` full blocks of `seq`, computed once and kept on `seq`."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else b"", seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq`. The block holding the last token is never taken:
        at least one token must be computed to get the logits that the next token is sampled from."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in self._seq_hashes(seq, max_blocks)[:max_blocks]:
            b = self._cached.get(h)
            if b is None:
                break  # the hash is chained: no later block can hit either
            hits.append(b)
        return hits

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _take_free_block(self) -> int:
        """Take the front free block for fresh use, evicting its prefix hash."""
        b, _ = self._free.popitem(last=False)
        block = self.blocks[b]
        if block.hash is not None:
            if self._cached.get(block.hash) == b:
                del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return b

    def _append_cost(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks that `append_slots` would take: new blocks at the end plus copy-on-write blocks."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens is {num_new_tokens}; it must be >= 0")
        bs, table = self.block_size, seq.block_table
        end_block = _cdiv(seq.num_computed_tokens + num_new_tokens, bs)
        shared = sum(
            1
            for i in range(seq.num_computed_tokens // bs, min(len(table), end_block))
            if self.blocks[table[i]].ref_count > 1
        )
        return max(0, end_block - len(table)) + shared
