"""Block indexes kept in memory between requests: an LRU bounded by bytes.

Loading a session's index from the store means reading and deserialising one faiss index per
layer and head (hundreds of MB at 256k tokens); doing it on every Retrieve would make each request
cost the whole index. The cache keys an index by the session *generation* it was built from
(tenant, session id, version, creation time) and its settings tag, so a session that was appended
to, overwritten or deleted never hits an old entry (the stale entry ages out of the LRU).
"""
from __future__ import annotations

from kvstore.lru import ByteLRU
from kvstore.records import SessionRecord


def index_key(record: SessionRecord, tag: str) -> tuple:
    return (record.tenant, record.session_id, record.version, record.created_at_ms, tag)


class IndexCache(ByteLRU):
    """Thread-safe LRU of indexes (anything with an ``nbytes`` attribute), bounded by their bytes.

    An index larger than the bound is not kept (every request then loads it from the store)."""

    what = "index cache"
