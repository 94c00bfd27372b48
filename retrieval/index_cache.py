"""Block indexes kept in memory between requests: an LRU bounded by bytes.

Loading a session's index from the store means reading and deserialising one faiss index per
layer and head (hundreds of MB at 256k tokens); doing it on every Retrieve would make each request
cost the whole index. The cache keys an index by the session *generation* it was built from
(tenant, session id, version, creation time) and its settings tag, so a session that was appended
to, overwritten or deleted never hits an old entry (the stale entry ages out of the LRU).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

from kvstore.records import SessionRecord


def index_key(record: SessionRecord, tag: str) -> tuple:
    return (record.tenant, record.session_id, record.version, record.created_at_ms, tag)


class IndexCache:
    """Thread-safe LRU of indexes (anything with an ``nbytes`` attribute), bounded by their bytes.

    An index larger than the bound is not kept (every request then loads it from the store)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"index cache bytes must be >= 0, got {max_bytes}")
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

    def put(self, key: Hashable, index: Any) -> None:
        size = int(index.nbytes)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (index, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
