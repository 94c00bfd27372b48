"""A thread-safe least-recently-used map bounded by the bytes of what it holds.

Shared by the caches that keep decoded or built things in memory between requests (session
records: kvstore/record_cache.py; block indexes: retrieval/index_cache.py)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable


class ByteLRU:
    """Values with a size in bytes; once the sizes pass ``max_bytes`` the least recently used
    go first. A value larger than the bound is not kept (0: nothing is)."""

    what = "cache"  # names the cache in errors

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"{self.what} bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Any, size: int | None = None) -> None:
        """Keep ``value`` under ``key`` (replacing what was there); ``size`` defaults to its
        ``nbytes``."""
        size = int(value.nbytes) if size is None else int(size)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
