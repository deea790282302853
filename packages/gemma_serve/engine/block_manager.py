"""`BlockManager`: owns the KV cache's blocks. Allocation, ref counts, and prefix caching.

A full block is identified by the hash of (previous block's hash, its token ids, the content hashes
of the images whose tokens it holds: image tokens all have the same id, so the ids alone would let two
prompts with different images share K/V). Its hash is
registered only once its K/V have been computed, so a later request with the same prefix maps the
same physical block instead of recomputing it. Freed blocks keep their hash until they are reused,
so a prefix stays cached while memory allows.

Models with sliding-window layers (Gemma 2/3) can keep those layers' K/V in a second pool (`window`
set): a sequence's `window_table` indexes it like `block_table` does the first pool, but a block
whose tokens are all older than the window of the sequence's next token is given back (its entry
becomes FREED), so the sliding layers hold about `window` tokens per sequence whatever its length.
Blocks are only ever allocated up to the tokens being computed. A prefix-cache hit needs its last
`window` tokens' blocks in both pools.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from gemma_serve.engine.sequence import Sequence

# A window_table entry whose block was given back (never read: older than every query's window).
FREED = -1


def block_hash(previous: bytes, token_ids: list[int], images: bytes = b"") -> bytes:
    """A 128-bit digest of the whole prefix up to this block. A cryptographic hash, not Python's
    `hash()`, so that crafted prompts cannot collide with another request's cached prefix. `images`
    (`Sequence.image_key`) follows the fixed-size previous hash and ids, so the input is unambiguous."""
    return hashlib.blake2b(previous + array("q", token_ids).tobytes() + images, digest_size=16).digest()


class BlockPool:
    """One pool of blocks: ref counts, the free list (least recently freed first, so recent
    prefixes stay cached longest) and the hashes of the cached blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    def take(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.hash_of[block] = None
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of a cached block (a prefix hit)."""
        self.free.pop(block, None)
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            self.free[block] = None

    def publish(self, h: bytes, block: int) -> None:
        if h not in self.cached:
            self.cached[h] = block
            self.hash_of[block] = h


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None, num_window_blocks: int | None = None) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.window = window
        self.window_pool = BlockPool(num_window_blocks or num_blocks) if window else None

    # The first pool's figures (every layer's, without a window pool), as the engine reports them.
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.pool.free)

    @property
    def ref_counts(self) -> list[int]:
        return self.pool.ref_counts

    @property
    def num_free_window_blocks(self) -> int:
        return len(self.window_pool.free) if self.window_pool else 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def first_window_block(self, position: int) -> int:
        """The oldest block a query at `position` reads on a sliding layer."""
        return max(0, position - self.window + 1) // self.block_size

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        hashes, previous = [], b""
        for i in range(count):
            start, end = i * self.block_size, (i + 1) * self.block_size
            previous = block_hash(previous, seq.token_ids[start:end], seq.image_key(start, end))
            hashes.append(previous)
        return hashes

    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks for the sequence's leading full blocks: (first pool's, window pool's from
        `first_window_block` of the first token computed on). The block holding the last token is
        never reused: that token is always computed, to produce the logits for the next one."""
        if not self.prefix_caching:
            return [], []
        hashes = self._hashes(seq, (seq.num_tokens - 1) // self.block_size)
        hits = []
        for h in hashes:
            block = self.pool.cached.get(h)
            if block is None:
                break
            hits.append(block)
        while hits and self.window_pool is not None:
            # The sliding layers need the last window before the first computed token too.
            first = self.first_window_block(len(hits) * self.block_size)
            window_hits = [self.window_pool.cached.get(h) for h in hashes[first:len(hits)]]
            if None not in window_hits:
                return hits, window_hits
            hits.pop()
        return hits, []

    def can_allocate(self, seq: Sequence, first_chunk: int | None = None) -> bool:
        """Room for the sequence's blocks (and, with a window pool, for its first chunk of at most
        `first_chunk` tokens in that pool)."""
        hits, window_hits = self._prefix_hits(seq)
        reusable_free = sum(1 for b in hits if b in self.pool.free)
        if self.blocks_needed(seq.num_tokens) - len(hits) > self.num_free_blocks - reusable_free:
            return False
        if self.window_pool is None:
            return True
        start = len(hits) * self.block_size
        end = min(seq.num_tokens, start + (first_chunk or seq.num_tokens))
        new = self.blocks_needed(end) - len(hits)
        reusable = sum(1 for b in window_hits if b in self.window_pool.free)
        return new <= len(self.window_pool.free) - reusable

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of the sequence's current tokens (window pool: only the prefix hits; `grow`
        adds the rest chunk by chunk); prefix-cache hits count as computed."""
        assert not seq.block_table
        hits, window_hits = self._prefix_hits(seq)
        for block in hits:
            self.pool.share(block)
            seq.block_table.append(block)
            seq.block_hashes.append(self.pool.hash_of[block])
        seq.num_hashed_blocks = len(hits)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        for _ in range(self.blocks_needed(seq.num_tokens) - len(hits)):
            seq.block_table.append(self.pool.take())
        if self.window_pool is not None:
            first = len(hits) - len(window_hits)
            seq.window_table = [FREED] * first
            seq.window_freed = first
            for block in window_hits:
                self.window_pool.share(block)
                seq.window_table.append(block)

    def _window_blocks(self, seq: Sequence, start: int, num_tokens: int) -> tuple[int, int]:
        """(blocks to take, blocks given back) in the window pool for computing tokens
        [start, num_tokens)."""
        keep_from = self.first_window_block(start)
        freed = sum(1 for b in seq.window_table[:keep_from] if b != FREED)
        return max(0, self.blocks_needed(num_tokens) - len(seq.window_table)), freed

    def fits(self, seq: Sequence, num_tokens: int) -> bool:
        """No block to take in any pool for `num_tokens` tokens in total."""
        need = self.blocks_needed(num_tokens)
        return need <= len(seq.block_table) and (self.window_pool is None or need <= len(seq.window_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        if self.blocks_needed(num_tokens) - len(seq.block_table) > self.num_free_blocks:
            return False
        if self.window_pool is None:
            return True
        take, freed = self._window_blocks(seq, seq.num_computed_tokens, num_tokens)
        return take <= len(self.window_pool.free) + freed

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total (computed from seq.num_computed_tokens on);
        window blocks no query of those tokens reads go back to their pool first."""
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self.pool.take())
        if self.window_pool is not None:
            self.trim_window(seq, seq.num_computed_tokens)
            for _ in range(self.blocks_needed(num_tokens) - len(seq.window_table)):
                seq.window_table.append(self.window_pool.take())

    def trim_window(self, seq: Sequence, start: int) -> None:
        """Give back the window blocks that no query from position `start` on reads."""
        table = seq.window_table
        for i in range(seq.window_freed, min(self.first_window_block(start), len(table))):
            if table[i] != FREED:
                self.window_pool.release(table[i])
                table[i] = FREED
        seq.window_freed = max(seq.window_freed, min(self.first_window_block(start), len(table)))

    def register_computed(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that became full and computed."""
        if not self.prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_hashed_blocks, full):
            previous = seq.block_hashes[i - 1] if i else b""
            start, end = i * self.block_size, (i + 1) * self.block_size
            h = block_hash(previous, seq.token_ids[start:end], seq.image_key(start, end))
            seq.block_hashes.append(h)
            self.pool.publish(h, seq.block_table[i])
            if self.window_pool is not None and i < len(seq.window_table) and seq.window_table[i] != FREED:
                self.window_pool.publish(h, seq.window_table[i])
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free_blocks(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.pool.release(block)
        if self.window_pool is not None:
            for block in reversed(seq.window_table):
                if block != FREED:
                    self.window_pool.release(block)
        seq.block_table = []
        seq.window_table = []
        seq.window_freed = 0
        seq.block_table_epoch += 1
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0
