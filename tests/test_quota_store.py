"""Per-tenant usage kept in the write transactions, quotas refused atomically, and the upgrade
of data directories written before per-tenant usage existed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.codec import decode_session
from kvstore.errors import CapacityExceeded, InvalidRequest, NotFound
from kvstore.quota import Quota, TenantUsage
from kvstore.store import SessionStore
from tests.conftest import TOY_SPEC, random_layers

COUNTERS = ("sessions", "chunks", "stored_bytes", "logical_bytes")


def pieces_for(store, layers, start=0):
    end = start + layers[0][0].shape[1]
    pieces = store.new_pieces(TOY_SPEC, start, end)
    for layer, (k, v) in enumerate(layers):
        pieces.add_tensors(layer, start, k, v)
    return pieces


def save(store, tenant, session_id, tokens, seed=0, **kwargs):
    layers = random_layers(TOY_SPEC, len(tokens), seed=seed)
    store.save(tenant, session_id, TOY_SPEC, np.asarray(tokens), pieces_for(store, layers), **kwargs)
    return layers


def restored_equal(store, tenant, session_id, layers):
    keys, values, _ = store.restore(tenant, session_id).tensors()
    return all(torch.equal(k, a) and torch.equal(v, b) for k, v, (a, b) in zip(keys, values, layers))


def recomputed(store) -> dict[str, TenantUsage]:
    """Usage from scratch: every stored session, and the unique blocks each tenant refers to."""
    sessions, logical, chunks = {}, {}, {}
    with store.backend.read() as txn:
        for key, raw in txn.scan("sessions"):
            record = decode_session(key, raw)
            sessions[record.tenant] = sessions.get(record.tenant, 0) + 1
            logical[record.tenant] = logical.get(record.tenant, 0) + record.kv_bytes
            chunks.setdefault(record.tenant, set()).update(ref.key for ref in record.blocks)
        stored = {}
        for tenant, keys in chunks.items():
            total = 0
            for chunk in keys:
                for layer in range(TOY_SPEC.num_layers):
                    total += len(txn.get("blocks", chunk + layer.to_bytes(2, "big")))
            stored[tenant] = total
    return {tenant: TenantUsage(tenant, sessions[tenant], stored[tenant], logical[tenant]) for tenant in sessions}


def check_usage(store, tenants=("a", "b")) -> None:
    expected = recomputed(store)
    for tenant in tenants:
        assert store.usage(tenant) == expected.get(tenant, TenantUsage(tenant)), tenant
    stats = store.stats()
    assert sum(u.stored_bytes for u in expected.values()) == stats["stored_bytes"]
    assert sum(u.sessions for u in expected.values()) == stats["sessions"]
    assert sum(u.logical_bytes for u in expected.values()) == stats["logical_bytes"]


def state(store, tenant):
    stats = store.stats()
    return {key: stats[key] for key in COUNTERS}, store.usage(tenant), [(r.session_id, r.version) for r in store.list(tenant)[0]]


class Quotas:
    """A mutable quota table, as a reloaded key file would give."""

    def __init__(self, **per_tenant: Quota):
        self.table = dict(per_tenant)

    def __call__(self, tenant: str) -> Quota:
        return self.table.get(tenant, Quota())


@pytest.fixture
def quotas():
    return Quotas()


@pytest.fixture
def qstore(store_config, quotas):
    clock = [1000.0]
    store = SessionStore.open(store_config, clock=lambda: clock[0], quota_for=quotas)
    store.test_clock = clock
    yield store
    store.close()


def test_save_over_the_byte_quota_is_refused_and_changes_nothing(qstore, quotas):
    first = save(qstore, "a", "first", range(40), seed=1)
    one = qstore.usage("a").stored_bytes
    quotas.table["a"] = Quota(max_stored_bytes=one + one // 2)
    before = state(qstore, "a")
    with pytest.raises(CapacityExceeded, match=rf"tenant 'a' would store {2 * one} bytes, over its quota of {one + one // 2} \(quota.max_stored_bytes\); delete sessions"):
        save(qstore, "a", "second", range(100, 140), seed=2)
    assert state(qstore, "a") == before
    with pytest.raises(NotFound):
        qstore.get("a", "second")
    assert restored_equal(qstore, "a", "first", first)
    save(qstore, "b", "second", range(100, 140), seed=2)  # other tenants have their own quota
    qstore.delete("a", "first")
    assert qstore.usage("a") == TenantUsage("a")
    second = save(qstore, "a", "second", range(100, 140), seed=2)  # deleting freed the quota
    assert restored_equal(qstore, "a", "second", second)
    check_usage(qstore)


def test_deduplicated_blocks_count_once_against_the_quota(qstore, quotas):
    save(qstore, "a", "base", range(64), seed=1)
    base = qstore.usage("a").stored_bytes
    quotas.table["a"] = Quota(max_stored_bytes=base + base // 4)
    layers = random_layers(TOY_SPEC, 64, seed=1)
    extra = random_layers(TOY_SPEC, 8, seed=9)
    both = [(torch.cat([k, x], 1), torch.cat([v, y], 1)) for (k, v), (x, y) in zip(layers, extra)]
    qstore.save("a", "longer", TOY_SPEC, np.arange(72), pieces_for(qstore, both))  # shares the 64-token prefix
    assert qstore.usage("a").stored_bytes < base + base // 4 and qstore.usage("a").logical_bytes == (64 + 72) * TOY_SPEC.bytes_per_token
    with pytest.raises(CapacityExceeded, match="quota.max_stored_bytes"):
        save(qstore, "a", "fresh", range(500, 564), seed=3)  # nothing to share
    check_usage(qstore)


def test_session_count_quota(qstore, quotas):
    quotas.table["a"] = Quota(max_sessions=2)
    save(qstore, "a", "one", range(10), seed=1)
    save(qstore, "a", "two", range(20, 30), seed=2)
    before = state(qstore, "a")
    with pytest.raises(CapacityExceeded, match=r"tenant 'a' would hold 3 sessions, over its quota of 2 \(quota.max_sessions\)"):
        save(qstore, "a", "three", range(40, 50), seed=3)
    with pytest.raises(CapacityExceeded, match="quota.max_sessions"):
        qstore.fork("a", "one", "fork")
    assert state(qstore, "a") == before
    replaced = save(qstore, "a", "two", range(60, 75), seed=4, overwrite=True)  # an overwrite adds no session
    assert restored_equal(qstore, "a", "two", replaced)
    qstore.delete("a", "one")
    qstore.fork("a", "two", "fork", 8)
    assert qstore.usage("a").sessions == 2
    check_usage(qstore)


def test_writes_that_shrink_usage_are_allowed_over_quota(qstore, quotas):
    save(qstore, "a", "big", range(64), seed=1)
    quotas.table["a"] = Quota(max_stored_bytes=1000)  # set below what the tenant already stores
    before = state(qstore, "a")
    with pytest.raises(CapacityExceeded):
        qstore.append("a", "big", TOY_SPEC, np.arange(4), pieces_for(qstore, random_layers(TOY_SPEC, 4), 64))
    with pytest.raises(CapacityExceeded):
        save(qstore, "a", "big", range(100), seed=2, overwrite=True)  # bigger
    assert state(qstore, "a") == before and qstore.get("a", "big").version == 1
    small = save(qstore, "a", "big", range(200, 220), seed=3, overwrite=True)  # smaller: allowed though still over
    assert restored_equal(qstore, "a", "big", small) and qstore.usage("a").stored_bytes > 1000
    quotas.table["a"] = Quota()  # the table is read on every write
    qstore.append("a", "big", TOY_SPEC, np.arange(4), pieces_for(qstore, random_layers(TOY_SPEC, 4), 20))
    qstore.quota_for = lambda tenant: Quota(max_sessions=1)  # or replaced as a whole
    with pytest.raises(CapacityExceeded, match="quota.max_sessions"):
        save(qstore, "a", "another", range(5), seed=4)
    check_usage(qstore)


def test_usage_follows_every_kind_of_write(qstore):
    check_usage(qstore)
    save(qstore, "a", "s1", range(40), seed=1, ttl_seconds=10)
    one = qstore.usage("a").stored_bytes
    check_usage(qstore)
    save(qstore, "a", "s2", list(range(32)) + [7] * 5, seed=1)  # dedups the first 32 tokens (two chunks)
    assert one < qstore.usage("a").stored_bytes < 1.5 * one
    check_usage(qstore)
    a_before = qstore.usage("a")
    save(qstore, "b", "s1", range(40), seed=1)  # same tokens, other tenant: never shared
    assert qstore.usage("b").stored_bytes == one and qstore.usage("a") == a_before
    check_usage(qstore)
    qstore.append("a", "s2", TOY_SPEC, np.arange(20), pieces_for(qstore, random_layers(TOY_SPEC, 20, seed=5), 37))
    check_usage(qstore)
    qstore.fork("a", "s2", "child", 40)  # copies the boundary chunk
    qstore.fork("a", "s2", "whole")
    check_usage(qstore)
    save(qstore, "a", "child", range(300, 310), seed=6, overwrite=True)
    check_usage(qstore)
    qstore.delete("a", "whole")
    check_usage(qstore)
    compacted = random_layers(TOY_SPEC, 6, seed=8)
    pieces = qstore.new_pieces(TOY_SPEC, 0, 6, has_bias=True)
    for layer, (k, v) in enumerate(compacted):
        pieces.add_tensors(layer, 0, k, v, torch.zeros(TOY_SPEC.num_kv_heads, 6))
    qstore.save("b", "compact", TOY_SPEC, np.arange(6), pieces, positions=[0, 3, 9, 20, 21, 22], logical_length=30)  # private blocks
    qstore.fork("b", "compact", "compact-fork", 4)
    check_usage(qstore)
    qstore.test_clock[0] += 11
    assert qstore.collect_expired() == 1  # a/s1
    check_usage(qstore)
    for tenant in ("a", "b"):
        for record in qstore.list(tenant)[0]:
            qstore.delete(tenant, record.session_id)
    assert qstore.usage("a") == TenantUsage("a") and qstore.usage("b") == TenantUsage("b")
    with qstore.backend.read() as txn:
        assert txn.count("usage") == 0  # empty rows are removed
    check_usage(qstore)


def test_usage_of_a_bad_tenant_and_bad_quotas_are_invalid(qstore):
    with pytest.raises(InvalidRequest):
        qstore.usage("bad\nname")
    for bad in ({"max_stored_bytes": -1}, {"max_sessions": 1.5}, {"max_sessions": True}):
        with pytest.raises(InvalidRequest, match="quota"):
            Quota(**bad)
    assert qstore.usage("nobody") == TenantUsage("nobody")


@pytest.mark.parametrize("drop_database", [False, True])
def test_data_written_without_tenant_usage_gets_it_computed_at_open(store_config, drop_database):
    store = SessionStore.open(store_config)
    save(store, "a", "s1", range(40), seed=1)
    save(store, "a", "s2", list(range(32)) + [9] * 3, seed=1)
    save(store, "b", "s1", range(20), seed=2)
    store.fork("a", "s1", "f", 20)
    expected = recomputed(store)

    def forget(txn):  # what a data directory of the previous version looks like
        if drop_database:
            txn.clear("usage")
        else:
            for key in [key for key, _ in txn.scan("usage", values=False)]:
                txn.delete("usage", key)
        txn.delete("meta", b"tenant_usage")

    store.backend.write(forget)
    store.close()
    reopened = SessionStore.open(store_config)
    assert {t: reopened.usage(t) for t in ("a", "b")} == expected
    assert not reopened.upgrade_usage()  # once: the marker is set
    save(reopened, "a", "s3", range(500, 510), seed=3)
    check_usage(reopened)
    reopened.close()
