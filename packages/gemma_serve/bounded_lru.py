"""A least-recently-used map bounded by entry count and by the summed size of its values.

Both image caches use it: the API layer's cache of preprocessed pixels (api/images.py) and the engine's
cache of encoded image features (engine/multimodal.py). Thread-safe: the API cache is filled from
worker threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

V = TypeVar("V")


class BoundedLRU(Generic[V]):
    def __init__(self, max_entries: int, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> V | None:
        """The value, now the most recently used; None (a miss) if absent."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: V) -> None:
        """Insert or replace, then evict least recently used entries until both bounds hold. A value
        larger than `max_bytes` on its own is not cached."""
        size = self._size_of(value)
        if size > self.max_bytes or self.max_entries <= 0:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self._size_of(old)
            self._entries[key] = value
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self._size_of(evicted)
                self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "entries": len(self._entries), "bytes": self._bytes}
