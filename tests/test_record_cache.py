"""Decoded session records are reused only while the store holds the very bytes they came from."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvstore.errors import CorruptData
from kvstore.keys import session_key
from kvstore.store import SessionStore
from tests.conftest import TOY_SPEC, random_layers
from tests.test_damage import _flip_value
from tests.test_store import pieces_for, save


def test_a_record_is_decoded_once_per_stored_version(store):
    save(store, "s", range(40), random_layers(TOY_SPEC, 40, seed=1))
    first = store.get("t", "s")
    assert store.get("t", "s") is first  # same bytes: the record decoded before
    with pytest.raises(ValueError):
        first.token_ids[0] = 7  # shared between callers: read-only
    store.append("t", "s", TOY_SPEC, np.arange(40, 50), pieces_for(store, random_layers(TOY_SPEC, 10, seed=2), start=40))
    appended = store.get("t", "s")
    assert appended is not first and appended.num_tokens == 50 and np.array_equal(appended.token_ids, np.arange(50))
    save(store, "s", range(100, 120), random_layers(TOY_SPEC, 20, seed=3), overwrite=True)
    assert np.array_equal(store.get("t", "s").token_ids, np.arange(100, 120))  # an overwrite is seen at once
    store.delete("t", "s")
    with pytest.raises(Exception, match="does not exist"):
        store.get("t", "s")


def test_damage_after_a_cached_read_is_still_detected(store):
    save(store, "s", range(30), random_layers(TOY_SPEC, 30, seed=4))
    assert store.get("t", "s").num_tokens == 30
    _flip_value(store, "sessions", session_key("t", "s"), offset=40)
    with pytest.raises(CorruptData, match="checksum"):
        store.get("t", "s")
    with pytest.raises(CorruptData):
        store.get("t", "s")  # and stays detected: nothing damaged was cached


def test_the_cache_holds_at_most_its_bytes(store_config):
    store = SessionStore.open(dataclasses.replace(store_config, record_cache_bytes=6000))
    try:
        for i in range(12):
            save(store, f"s{i}", range(200), random_layers(TOY_SPEC, 200, seed=i))
            store.get("t", f"s{i}")
            assert store.records.bytes <= 6000
        assert 0 < len(store.records) < 12
        assert all(store.get("t", f"s{i}").num_tokens == 200 for i in range(12))  # evicted ones decode again
    finally:
        store.close()
    off = SessionStore.open(dataclasses.replace(store_config, record_cache_bytes=0))
    try:
        assert off.get("t", "s3") is not off.get("t", "s3") and off.records.bytes == 0
    finally:
        off.close()
