"""The in-memory index LRU: bounded by bytes, least recently used out first, keyed by generation."""
from dataclasses import dataclass

import numpy as np
import pytest

from kvstore.records import SessionRecord
from retrieval.index_cache import IndexCache, index_key
from tests.conftest import TOY_SPEC


@dataclass
class Sized:
    nbytes: int


def test_lru_stays_within_its_bytes_and_evicts_the_least_recently_used():
    cache = IndexCache(100)
    a, b, c = Sized(40), Sized(40), Sized(40)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("c", c)  # 120 > 100: b goes
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    assert cache.bytes == 80 and len(cache) == 2
    cache.put("a", Sized(10))  # replacing an entry counts its new size only
    assert cache.bytes == 50
    cache.put("huge", Sized(101))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and cache.bytes == 50 and len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 2)


def test_zero_bytes_keeps_nothing_and_negative_is_refused():
    cache = IndexCache(0)
    cache.put("a", Sized(1))
    assert cache.get("a") is None and cache.bytes == 0
    with pytest.raises(ValueError):
        IndexCache(-1)


def test_keys_tell_generations_and_settings_apart():
    record = SessionRecord("t", "s", TOY_SPEC, np.zeros(0, np.uint32), [], version=3, created_at_ms=1000)
    again = SessionRecord("t", "s", TOY_SPEC, np.zeros(0, np.uint32), [], version=3, created_at_ms=2000)  # overwritten: versions restart
    appended = SessionRecord("t", "s", TOY_SPEC, np.zeros(0, np.uint32), [], version=4, created_at_ms=1000)
    other = SessionRecord("u", "s", TOY_SPEC, np.zeros(0, np.uint32), [], version=3, created_at_ms=1000)
    keys = {index_key(r, "b64-r4") for r in (record, again, appended, other)} | {index_key(record, "b64-r0")}
    assert len(keys) == 5
