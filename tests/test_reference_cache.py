"""compaction.references.ReferenceCache: the hosted model's reference queries, kept per session generation."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from compaction.references import ReferenceCache


def record(version=1, created=10, session="doc"):
    return SimpleNamespace(tenant="t", session_id=session, version=version, created_at_ms=created)


def queries(seed, n=8):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, 4, generator=generator)], [torch.randn(2, 2, 4, generator=generator)]


def test_queries_are_made_once_per_session_generation_and_handed_out_as_copies():
    cache = ReferenceCache(1 << 20)
    made = []

    def make(seed):
        def run():
            made.append(seed)
            return queries(seed)
        return run

    first = cache.get_or_make(ReferenceCache.key(record(), b"m"), make(1))
    again = cache.get_or_make(ReferenceCache.key(record(), b"m"), make(2))
    assert made == [1] and (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(first[0][0], again[0][0]) and torch.equal(first[1][0], again[1][0])
    again[0][0].zero_()  # a compactor changing its input in place does not change the cache
    assert torch.equal(cache.get_or_make(ReferenceCache.key(record(), b"m"), make(3))[0][0], first[0][0])
    cache.get_or_make(ReferenceCache.key(record(version=2), b"m"), make(4))  # an append: new generation
    cache.get_or_make(ReferenceCache.key(record(created=11), b"m"), make(5))  # deleted and saved again
    cache.get_or_make(ReferenceCache.key(record(), b"other-model"), make(6))
    assert made == [1, 4, 5, 6]


def test_least_recently_used_sessions_leave_first_and_zero_bytes_caches_nothing():
    one = sum(q.nbytes for part in queries(0) for q in part)
    cache = ReferenceCache(2 * one)
    for name in ("a", "b"):
        cache.get_or_make(ReferenceCache.key(record(session=name), b"m"), lambda: queries(0))
    cache.get_or_make(ReferenceCache.key(record(session="a"), b"m"), lambda: queries(0))  # a is now the most recent
    cache.get_or_make(ReferenceCache.key(record(session="c"), b"m"), lambda: queries(0))  # evicts b
    assert cache.bytes == 2 * one
    hits = cache.hits
    cache.get_or_make(ReferenceCache.key(record(session="a"), b"m"), lambda: queries(0))
    cache.get_or_make(ReferenceCache.key(record(session="b"), b"m"), lambda: queries(0))
    assert cache.hits == hits + 1  # a was kept, b was made again
    off = ReferenceCache(0)
    off.get_or_make(ReferenceCache.key(record(), b"m"), lambda: queries(0))
    off.get_or_make(ReferenceCache.key(record(), b"m"), lambda: queries(0))
    assert (off.hits, off.misses, off.bytes) == (0, 2, 0)
