"""`BlockManager` on its own: allocation, ref counts, prefix caching by chained block hashes."""

from gemma_serve.engine.block_manager import BlockManager, block_hash
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.engine.sequence import Sequence


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, tokens, SamplingParams(), 0)


def computed(bm: BlockManager, s: Sequence) -> None:
    """As after the step that computed all of the sequence's tokens."""
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s)


def test_hash_chains_the_whole_prefix():
    a = block_hash(b"", [1, 2, 3, 4])
    assert a == block_hash(b"", [1, 2, 3, 4]) and a != block_hash(b"", [1, 2, 3, 5])
    # Same block tokens after a different prefix: another block.
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(b"", [0, 2, 3, 4]), [5, 6, 7, 8])


def test_allocate_grow_free_and_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5 and s.num_computed_tokens == 0
    assert bm.can_grow(s, 12) and not bm.can_grow(s, 33)
    bm.grow(s, 13)
    assert len(s.block_table) == 4 and bm.num_free_blocks == 4
    bm.free_blocks(s)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_counts) and s.block_table == []


def test_prefix_hit_shares_blocks_and_never_covers_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = seq(list(range(12)), "first")
    bm.allocate(first)
    computed(bm, first)
    # Same 12 tokens: the block holding the last token is recomputed, the first two are shared.
    second = seq(list(range(12)), "second")
    bm.allocate(second)
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert second.num_computed_tokens == second.num_cached_tokens == 8
    assert [bm.ref_counts[b] for b in first.block_table] == [2, 2, 1]
    # A diverging prompt shares only the common full blocks.
    third = seq(list(range(6)) + [99] * 8, "third")
    bm.allocate(third)
    assert third.block_table[0] == first.block_table[0] and third.block_table[1] != first.block_table[1]
    for s in (first, second, third):
        bm.free_blocks(s)
    assert bm.num_free_blocks == 16 and all(c == 0 for c in bm.ref_counts)


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(list(range(9)))
    bm.allocate(s)
    computed(bm, s)
    table = list(s.block_table)
    bm.free_blocks(s)
    again = seq(list(range(9)))
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.block_table[:2] == table[:2] and again.num_cached_tokens == 8
    bm.free_blocks(again)
    # Other tokens take every block: the old prefix is evicted and no longer hits.
    other = seq(list(range(100, 116)))
    bm.allocate(other)
    bm.free_blocks(other)
    late = seq(list(range(9)))
    bm.allocate(late)
    assert late.num_cached_tokens == 0


def test_can_allocate_counts_free_cached_blocks_once():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(list(range(9)))  # 3 blocks, the first two full and cached once computed
    bm.allocate(s)
    computed(bm, s)
    bm.free_blocks(s)
    bm.allocate(seq([200, 201, 202, 203], "holder"))  # takes the never-used block
    assert bm.num_free_blocks == 3
    # 2 hits (free but cached) + 1 new block: fits.
    assert bm.can_allocate(seq(list(range(9))))
    # 2 hits + 2 new blocks: the hits themselves use up 2 of the 3 free blocks, so it does not fit.
    assert not bm.can_allocate(seq(list(range(8)) + [50, 51, 52, 53, 54]))


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    s = seq(list(range(9)))
    bm.allocate(s)
    computed(bm, s)
    again = seq(list(range(9)))
    bm.allocate(again)
    assert again.num_cached_tokens == 0 and set(again.block_table).isdisjoint(s.block_table)
