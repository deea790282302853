"""`BlockManager`: owns the KV cache's blocks. Allocation, ref counts, and prefix caching.

A full block is identified by the hash of (previous block's hash, its token ids, the content hashes
of the images whose tokens it holds: image tokens all have the same id, so the ids alone would let two
prompts with different images share K/V). Its hash is
registered only once its K/V have been computed, so a later request with the same prefix maps the
same physical block instead of recomputing it. Freed blocks keep their hash until they are reused,
so a prefix stays cached while memory allows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from gemma_serve.engine.sequence import Sequence


def block_hash(previous: bytes, token_ids: list[int], images: bytes = b"") -> bytes:
    """A 128-bit digest of the whole prefix up to this block. A cryptographic hash, not Python's
    `hash()`, so that crafted prompts cannot collide with another request's cached prefix. `images`
    (`Sequence.image_key`) follows the fixed-size previous hash and ids, so the input is unambiguous."""
    return hashlib.blake2b(previous + array("q", token_ids).tobytes() + images, digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        # Free blocks in least-recently-freed order: reuse the oldest first, keep recent prefixes.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.hash_of[block] = None
        self.ref_counts[block] = 1
        return block

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks for the sequence's leading full blocks. The block holding the last token is
        never reused: that token is always computed, to produce the logits for the next one."""
        if not self.prefix_caching:
            return []
        hits, previous = [], b""
        for i in range((seq.num_tokens - 1) // self.block_size):
            start, end = i * self.block_size, (i + 1) * self.block_size
            h = block_hash(previous, seq.token_ids[start:end], seq.image_key(start, end))
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
            previous = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        reusable_free = sum(1 for b in hits if b in self.free)
        return self.blocks_needed(seq.num_tokens) - len(hits) <= self.num_free_blocks - reusable_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of the sequence's current tokens; prefix-cache hits count as computed."""
        assert not seq.block_table
        hits = self._prefix_hits(seq)
        for block in hits:
            if block in self.free:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(self.hash_of[block])
        seq.num_hashed_blocks = len(hits)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        for _ in range(self.blocks_needed(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_free())

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total."""
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free())

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
            block = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.hash_of[block] = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free_blocks(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_table_epoch += 1
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0
