"""BlockManager and Sequence: allocation, reference counts, prefix caching, LRU eviction, fork and copy-on-write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kiln.engine.block_manager import BlockManager, hash_block
from kiln.engine.sequence import FinishReason, Sequence, SequenceStatus

BS = 4


def make_seq(seq_id: int, tokens: list[int], max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=tokens, max_tokens=max_tokens)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What a step that computes every remaining token does, as far as the block manager is concerned."""
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq)


def ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


# ---- Sequence ----------------------------------------------------------------------------------------------------


def test_sequence_state_and_properties():
    seq = Sequence(seq_id=3, prompt_token_ids=[5, 6, 7], max_tokens=4, stop_token_ids=[2])
    assert seq.stop_token_ids == frozenset({2})
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (3, 3, 0)
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished
    seq.append_token(9)
    seq.append_token(2)
    assert seq.token_ids == [5, 6, 7, 9, 2]
    assert seq.output_token_ids == [9, 2] and seq.num_output_tokens == 2
    assert seq.last_token_id == 2
    assert seq.prompt_token_ids == [5, 6, 7]  # the prompt is not aliased by token_ids
    assert FinishReason.STOP == "stop" and FinishReason.LENGTH == "length" and FinishReason.ABORT == "abort"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_token_ids=[], max_tokens=4), "prompt is empty"),
        (dict(prompt_token_ids=[1], max_tokens=0), "max_tokens"),
        (dict(prompt_token_ids=[1], max_tokens=4, min_tokens=-1), "min_tokens"),
        (dict(prompt_token_ids=[1, -3], max_tokens=4), r"prompt_token_ids\[1\] is -3"),
    ],
)
def test_sequence_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sequence(seq_id=0, **kwargs)
    with pytest.raises(TypeError, match="must be integers"):
        Sequence(seq_id=0, prompt_token_ids=[1.5], max_tokens=1)


def test_engine_modules_do_not_import_torch():
    # Stub the top-level package so that only kiln/engine is imported (kiln/__init__ may pull in torch).
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('kiln'); pkg.__path__ = [{str(root / 'kiln')!r}]; sys.modules['kiln'] = pkg\n"
        "import kiln.engine.sequence, kiln.engine.block_manager, kiln.engine.scheduler\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- allocation and free -----------------------------------------------------------------------------------------


def test_constructor_validates():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, BS)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(0, list(range(10)))  # 10 tokens -> 3 blocks
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    assert seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate(seq)
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    assert ref_counts(bm) == [0] * 8


def test_append_slots_grows_the_table_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq(0, [1, 2, 3])
    bm.allocate(seq)
    compute_all(bm, seq)
    seq.append_token(4)  # position 3: still in block 0
    assert bm.can_append(seq, 1) and bm.append_slots(seq, 1) == [] and len(seq.block_table) == 1
    seq.num_computed_tokens += 1
    seq.append_token(5)  # position 4: needs block 1
    assert bm.append_slots(seq, 1) == [] and len(seq.block_table) == 2
    assert bm.num_free_blocks == 2
    # A chunk of 9 more tokens from position 4 ends at position 12 -> 4 blocks; 5 would need 5 blocks.
    assert bm.can_append(seq, 9) and not bm.can_append(seq, 13)
    with pytest.raises(RuntimeError, match="can_append"):
        bm.append_slots(seq, 13)


# ---- prefix caching ----------------------------------------------------------------------------------------------


def test_prefix_blocks_are_shared_only_after_mark_computed():
    bm = BlockManager(num_blocks=10, block_size=BS)
    common = list(range(100, 108))  # two full blocks
    a = make_seq(0, common + [1, 2])
    bm.allocate(a)
    b = make_seq(1, common + [3, 4, 5])
    # Allocated but not computed: b must not read blocks that a has not written yet.
    assert bm.peek_prefix_hit_tokens(b) == 0
    a.num_computed_tokens = 6  # one full block computed, the second only half
    bm.mark_computed(a)
    assert bm.blocks[a.block_table[0]].hash is not None
    assert bm.blocks[a.block_table[1]].hash is None
    assert bm.peek_prefix_hit_tokens(b) == 4
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2  # the partial third block is never registered
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert [bm.blocks[x].ref_count for x in b.block_table] == [2, 2, 1]
    assert bm.num_prefix_hit_tokens == 8 and bm.num_prefix_query_tokens == 10 + 11
    assert bm.num_free_blocks == 10 - 4
    bm.free(a)
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10 and ref_counts(bm) == [0] * 10


def test_hash_is_chained_over_the_whole_prefix():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    compute_all(bm, a)
    # Same second block, different first block: no hit at all, since a block's hash names its whole prefix.
    b = make_seq(1, [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.peek_prefix_hit_tokens(b) == 0
    assert hash_block(b"", [1, 2]) != hash_block(b"", [1, 3])
    assert hash_block(hash_block(b"", [1]), [2]) != hash_block(b"", [2])


def test_the_last_token_is_always_computed():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(0, list(range(8)))  # exactly two full blocks
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2
    same = make_seq(1, list(range(8)))
    bm.allocate(same)
    # The block holding the last token is not taken from the cache: its logits are needed.
    assert same.num_cached_tokens == same.num_computed_tokens == 4
    assert same.block_table[0] == a.block_table[0] and same.block_table[1] != a.block_table[1]
    longer = make_seq(2, list(range(9)))
    bm.allocate(longer)
    assert longer.num_computed_tokens == 8 and longer.block_table[:2] == a.block_table[:2]
    shorter = make_seq(3, list(range(4)))  # one full block: nothing may be taken
    bm.allocate(shorter)
    assert shorter.num_computed_tokens == 0


def test_freed_blocks_keep_their_hash_and_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(0, [1, 1, 1, 1, 9])  # block 1 of a is partial
    b = make_seq(1, [2, 2, 2, 2, 9])
    for s in (a, b):
        bm.allocate(s)
        compute_all(bm, s)
    a_full, b_full = a.block_table[0], b.block_table[0]
    bm.free(a)  # a freed first: its full block is the least recently freed cached block
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # A hit on a free cached block revives it.
    a2 = make_seq(2, [1, 1, 1, 1, 7])
    bm.allocate(a2)
    assert a2.block_table[0] == a_full and a2.num_cached_tokens == 4
    bm.free(a2)  # a's block is now the most recently freed
    # Fresh allocations take the blocks without a hash first, then evict b's (least recently freed) block.
    c = make_seq(3, [3] * 12)
    bm.allocate(c)
    assert b_full in c.block_table and a_full not in c.block_table
    assert bm.blocks[b_full].hash is None and bm.num_cached_blocks == 1
    b2 = make_seq(4, [2, 2, 2, 2, 9])
    assert bm.peek_prefix_hit_tokens(b2) == 0
    a3 = make_seq(5, [1, 1, 1, 1, 8])
    assert bm.peek_prefix_hit_tokens(a3) == 4


def test_blocks_without_a_hash_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a, b = make_seq(0, [1, 1, 1, 1]), make_seq(1, [2, 2, 2])
    for s in (a, b):
        bm.allocate(s)
        compute_all(bm, s)
    a_block, b_block = a.block_table[0], b.block_table[0]
    assert bm.blocks[a_block].hash is not None and bm.blocks[b_block].hash is None
    bm.free(a)
    bm.free(b)  # freed last, but it holds nothing reusable
    c = make_seq(2, [3, 3])
    bm.allocate(c)
    assert c.block_table == [b_block]
    assert bm.peek_prefix_hit_tokens(make_seq(3, [1, 1, 1, 1, 5])) == 4


def test_reset_prefix_cache_and_disabled_caching():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(0, list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.peek_prefix_hit_tokens(make_seq(1, list(range(9)))) == 0
    bm.mark_computed(a)  # a running sequence registers its blocks again
    assert bm.num_cached_blocks == 2
    off = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    x, y = make_seq(0, list(range(9))), make_seq(1, list(range(9)))
    off.allocate(x)
    compute_all(off, x)
    off.allocate(y)
    assert y.num_computed_tokens == 0 and not set(x.block_table) & set(y.block_table)
    assert off.num_cached_blocks == 0 and off.num_prefix_hit_tokens == 0


def test_same_prefix_computed_twice_in_one_step():
    # Two requests with one prompt admitted together both compute it; the first registered block serves hits and
    # evicting the duplicate does not drop the entry.
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(0, list(range(6))), make_seq(1, list(range(6)))
    bm.allocate(a)
    bm.allocate(b)
    compute_all(bm, a)
    compute_all(bm, b)
    assert bm.num_cached_blocks == 1
    bm.free(b)
    bm.free(a)
    # Take every free block except one: the duplicate (b's, freed first) is evicted before a's.
    big = make_seq(2, [50] * 28)
    bm.allocate(big)
    assert a.block_table == [] and bm.num_free_blocks == 1
    assert bm.peek_prefix_hit_tokens(make_seq(3, list(range(6)))) == 4


class _CountingList(list):
    """A list that counts its element reads (indexing, and every element an iteration yields)."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)

    def __iter__(self):
        self.reads += len(self)
        return super().__iter__()


def _admission_work(num_blocks: int, monkeypatch) -> tuple[int, int, list[int]]:
    """Fill a cache of `num_blocks` 16-token blocks with cached prompts (all freed: the evictable pool an engine has
    after a burst), then admit, compute and free one request whose prompt is cached and one fresh long one that must
    evict cached blocks, as the scheduler does (can_allocate, peek, allocate, append_slots, mark_computed, free).
    Returns the reads of `blocks`, the hash_block calls made for the two, and their cached token counts."""
    import kiln.engine.block_manager as block_manager

    bs = 16
    bm = BlockManager(num_blocks, bs)
    filled = num_blocks // 8 - 1  # prompts of 8 full blocks and one token: the cache ends up almost all hashed
    prompts = [[i * 1000 + j for j in range(8 * bs + 1)] for i in range(filled)]
    for i, tokens in enumerate(prompts):
        s = make_seq(i, tokens)
        bm.allocate(s)
        compute_all(bm, s)
        bm.free(s)
    assert bm.num_free_blocks == num_blocks and bm.num_cached_blocks == 8 * filled
    bm.blocks = _CountingList(bm.blocks)
    calls = []
    monkeypatch.setattr(block_manager, "hash_block", lambda *a: calls.append(1) or hash_block(*a))
    hit = make_seq(filled, prompts[-1])  # the most recently freed prompt: all its full blocks are cached
    fresh = make_seq(filled + 1, [7_000_000 + j for j in range(32 * bs + 1)])  # 33 blocks, past the unhashed ones
    for seq in (hit, fresh):
        assert bm.can_allocate(seq)
        bm.peek_prefix_hit_tokens(seq)
        bm.allocate(seq)
        bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
        compute_all(bm, seq)
        bm.free(seq)
    return bm.blocks.reads, len(calls), [hit.num_cached_tokens, fresh.num_cached_tokens]


def test_admission_work_does_not_grow_with_the_cached_blocks(monkeypatch):
    # An H100 engine has ~7,500 blocks, most of them cached and free after a burst. Admitting a request (its prefix
    # lookups, taking blocks from the evictable pool, registering its blocks) must cost per block of the request,
    # never per block of the cache; and each full block of a sequence is hashed once, however many lookups run.
    small = _admission_work(200, monkeypatch)
    large = _admission_work(8000, monkeypatch)
    assert small[2] == large[2] == [128, 0]
    assert small[:2] == large[:2]
    reads, hashes, _ = large
    assert hashes == 8 + 32  # the full blocks of the two requests
    assert reads <= 8 * (9 + 33)  # a few reads per block of the two requests


# ---- can_allocate edge cases -------------------------------------------------------------------------------------


def test_can_allocate_exactly_enough_and_one_short():
    bm = BlockManager(num_blocks=5, block_size=BS)
    filler = make_seq(0, [7] * 8)  # 2 blocks
    bm.allocate(filler)
    assert bm.can_allocate(make_seq(1, [1] * 12))  # 3 blocks: exactly the 3 free
    assert not bm.can_allocate(make_seq(2, [1] * 13))  # 4 blocks: one short
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate(make_seq(2, [1] * 13))


def test_can_allocate_counts_hits_on_blocks_in_use_and_free_cached_blocks():
    bm = BlockManager(num_blocks=5, block_size=BS)
    owner = make_seq(0, [1] * 8 + [2])  # 3 blocks; its 2 full blocks get cached
    bm.allocate(owner)
    compute_all(bm, owner)
    assert bm.num_free_blocks == 2
    # 4 blocks needed, but the first two are hits on blocks in use: only 2 free blocks are needed.
    sharer = make_seq(1, [1] * 8 + [3] * 8)
    assert bm.can_allocate(sharer)
    assert not bm.can_allocate(make_seq(2, [1] * 8 + [3] * 9))  # 5 blocks: 3 free needed, one short
    bm.free(owner)
    # Now the cached blocks are free: a hit takes them out of the free list, same as a fresh block would.
    assert bm.num_free_blocks == 5
    assert bm.can_allocate(make_seq(3, [1] * 8 + [3] * 12))  # 5 blocks, 2 of them hits
    assert not bm.can_allocate(make_seq(4, [1] * 8 + [3] * 13))  # 6 blocks
    bm.allocate(sharer)
    assert sharer.num_cached_tokens == 8 and bm.num_free_blocks == 1


# ---- fork and copy-on-write --------------------------------------------------------------------------------------


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent = make_seq(0, list(range(6)))  # blocks: [full, partial (2 tokens)]
    bm.allocate(parent)
    compute_all(bm, parent)
    parent.append_token(40)  # sampled token at position 6, not computed yet
    child = parent.fork(1)
    assert child.token_ids == parent.token_ids and child.token_ids is not parent.token_ids
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and child.num_computed_tokens == 6
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [2, 2]
    shared_partial = parent.block_table[1]
    # The child writes position 6 into the shared partial block: it gets a private copy of it.
    assert bm.can_append(child, 1)
    copies = bm.append_slots(child, 1)
    assert len(copies) == 1 and copies[0][0] == shared_partial
    assert child.block_table[1] == copies[0][1] != shared_partial
    assert child.block_table[0] == parent.block_table[0]
    # The parent is now the only owner of its partial block: it writes in place.
    assert bm.append_slots(parent, 1) == [] and parent.block_table[1] == shared_partial
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [2, 1]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8 and ref_counts(bm) == [0] * 8


def test_copy_on_write_without_copy_for_uncomputed_blocks_and_cost_counting():
    bm = BlockManager(num_blocks=4, block_size=BS)
    parent = make_seq(0, list(range(8)))  # 2 blocks, nothing computed
    bm.allocate(parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert bm.num_free_blocks == 2
    assert bm.can_append(child, 8) and not bm.can_append(child, 9)  # 2 copy-on-write + 1 new = 3 > 2
    # Both blocks are shared, but neither holds computed tokens: private blocks, nothing to copy.
    assert bm.append_slots(child, 8) == []
    assert not set(child.block_table) & set(parent.block_table)
    with pytest.raises(ValueError, match="does not start with"):
        other = make_seq(2, [9] * 8)
        parent.num_computed_tokens = 4
        bm.fork(parent, other)
