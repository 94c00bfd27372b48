"""Damage is never silent and never hides healthy data: missing blocks, lost catalogue entries
and damaged records, through the store and over gRPC; verify and salvage (backup: tests/test_operations.py)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from kvmem.client import Client
from kvstore.catalog import DamagedSession
from kvstore.chunking import block_storage_key
from kvstore.errors import Conflict, CorruptData, NotFound
from kvstore.store import SessionStore, StoreConfig, session_key
from tests.conftest import REPO, TOY_SPEC, random_layers
from tests.test_store import pieces_for, restored, same


def _flip_value(store, space: str, key: bytes, offset: int = -1) -> None:
    def flip(txn):
        raw = bytearray(txn.get(space, key))
        raw[offset] ^= 0x20
        txn.put(space, key, bytes(raw))

    store.backend.write(flip)


def _fill(store, tenant="t", count=5, tokens=40):
    saved = {}
    for i in range(count):
        layers = random_layers(TOY_SPEC, tokens, seed=i)
        store.save(tenant, f"s{i}", TOY_SPEC, np.arange(1000 * i, 1000 * i + tokens), pieces_for(store, layers))
        saved[f"s{i}"] = layers
    return saved


def test_a_missing_block_of_a_committed_session_is_data_loss_naming_it(store):
    saved = _fill(store, count=2)
    record = store.get("t", "s1")
    store.backend.write(lambda txn: txn.delete("blocks", block_storage_key(record.blocks[1].key, 2)))
    store.blocks.forget([block_storage_key(record.blocks[1].key, 2)])
    with pytest.raises(CorruptData, match="'s1'.*layer 2 is missing.*damaged"):
        restored(store, "s1")
    _, out = restored(store, "s0")  # the neighbour is unaffected
    assert same(out, saved["s0"])


def test_a_block_gone_because_the_session_changed_is_conflict_or_not_found_never_damage(store):
    _fill(store, count=2)
    plan = store.restore("t", "s0")
    store.delete("t", "s0")
    with pytest.raises(NotFound, match="deleted while it was being read"):
        list(plan.pieces())
    plan = store.restore("t", "s1")
    store.save("t", "s1", TOY_SPEC, np.arange(500, 540), pieces_for(store, random_layers(TOY_SPEC, 40, seed=7)), overwrite=True)
    with pytest.raises(Conflict, match="changed while it was being read"):
        list(plan.pieces())


def test_a_lost_catalogue_entry_is_data_loss_never_a_shorter_list(store):
    saved = _fill(store, count=6)
    store.backend.write(lambda txn: txn.delete("sessions", session_key("t", "s3")))  # what a damaged B-tree page does
    with pytest.raises(CorruptData, match="catalogue of tenant 't' is damaged: 6 sessions are recorded but 5 were found"):
        store.list("t")
    with pytest.raises(CorruptData, match="'s3'.*not found"):
        store.get("t", "s3")  # not "never saved"
    _, out = restored(store, "s4")  # healthy sessions still restore
    assert same(out, saved["s4"])
    assert store.list("other")[0] == []  # other tenants are not affected


def test_one_damaged_record_is_listed_as_damaged_beside_the_healthy_ones(store):
    saved = _fill(store, count=4)
    _flip_value(store, "sessions", session_key("t", "s2"), offset=40)
    page, _ = store.list("t")
    damaged = [entry for entry in page if isinstance(entry, DamagedSession)]
    assert sorted(entry.session_id for entry in page) == ["s0", "s1", "s2", "s3"]
    assert [entry.session_id for entry in damaged] == ["s2"] and "checksum" in damaged[0].damage
    with pytest.raises(CorruptData):
        store.restore("t", "s2")
    for session_id in ("s0", "s1", "s3"):
        _, out = restored(store, session_id)
        assert same(out, saved[session_id])
    store.delete("t", "s2")  # a damaged session can be deleted
    assert [entry.session_id for entry in store.list("t")[0]] == ["s0", "s1", "s3"]
    with pytest.raises(NotFound):
        store.get("t", "s2")


def test_damage_over_grpc_is_data_loss_and_list_marks_the_damaged_id(service):
    with Client(f"127.0.0.1:{service.port}", spec=TOY_SPEC) as client:
        for i in range(3):
            client.save(f"s{i}", random_layers(TOY_SPEC, 20, seed=i), list(range(100 * i, 100 * i + 20)))
        _flip_value(service.store, "sessions", session_key("default", "s1"), offset=50)
        listed = {info.session_id: info.damage for info in client.list()}
        assert set(listed) == {"s0", "s1", "s2"} and listed["s1"] and not listed["s0"] and not listed["s2"]
        with pytest.raises(CorruptData):
            client.restore("s1", build_cache=False)
        record = service.store.get("default", "s2")
        service.store.backend.write(lambda txn: txn.delete("blocks", block_storage_key(record.blocks[0].key, 0)))
        service.store.blocks.forget([block_storage_key(record.blocks[0].key, 0)])
        with pytest.raises(CorruptData, match="s2"):
            client.restore("s2", build_cache=False)
        assert client.restore("s0", build_cache=False).layers[0][0].shape[1] == 20  # still serving


def _kvmem(*args, check=None):
    result = subprocess.run([sys.executable, "-m", "kvmem.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    if check is not None:
        assert result.returncode == check, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def _layers_equal(a, b):
    return all(torch.equal(x, y) for (xk, xv), (yk, yv) in zip(a, b) for x, y in ((xk, yk), (xv, yv)))


def test_verify_finds_planted_damage_and_salvage_copies_every_healthy_session(tmp_path):
    config = StoreConfig(data_dir=tmp_path / "data", chunk_tokens=16, cpu_tier_bytes=0, lmdb_map_bytes=8 << 20)
    store = SessionStore.open(config)
    saved = _fill(store, count=5)
    store.save("u", "text", TOY_SPEC, np.arange(20), pieces_for(store, random_layers(TOY_SPEC, 20, seed=9)), text="hello there")
    store.close()
    assert "ok" in _kvmem("verify", "--data-dir", config.data_dir, check=0).stdout
    store = SessionStore.open(config)
    damaged_block = store.get("t", "s1").blocks[2].key
    _flip_value(store, "blocks", block_storage_key(damaged_block, 1), offset=100)  # payload byte of one block
    _flip_value(store, "sessions", session_key("t", "s4"), offset=30)  # one record
    store.close()
    out = _kvmem("verify", "--data-dir", config.data_dir, check=1).stdout
    assert "DAMAGED session t/s1" in out and "checksum" in out and "DAMAGED session t/s4" in out
    report = _kvmem("verify", "--data-dir", config.data_dir, "--json", check=1).stdout
    assert '"ok": false' in report
    rescued = tmp_path / "rescued"
    out = _kvmem("salvage", config.data_dir, rescued, check=1).stdout
    assert "4 sessions copied" in out and "SKIPPED t/s1" in out and "SKIPPED t/s4" in out
    _kvmem("verify", "--data-dir", rescued, check=0)
    copy = SessionStore.open(StoreConfig(data_dir=rescued, chunk_tokens=16, cpu_tier_bytes=0))
    assert sorted(r.session_id for r in copy.list("t")[0]) == ["s0", "s2", "s3"]
    for session_id in ("s0", "s2", "s3"):
        keys, values, _ = copy.restore("t", session_id).tensors()
        assert _layers_equal(list(zip(keys, values)), saved[session_id])
    assert copy.session_text("u", "text") == "hello there"
    assert copy.lookup("t", TOY_SPEC, np.arange(0, 40)) == 40  # prefix dedup works in the copy
    copy.close()
    assert _kvmem("salvage", config.data_dir, rescued).returncode == 2  # never into a non-empty directory


def test_the_background_scrub_finds_a_damaged_block_and_wraps_around(store):
    from kvstore.scrub import Scrubber

    _fill(store, count=3)
    record = store.get("t", "s2")
    _flip_value(store, "blocks", block_storage_key(record.blocks[1].key, 3), offset=200)
    with store.backend.read() as txn:
        total = txn.count("blocks")
    scrubber = Scrubber(store, bytes_per_second=10_000)  # a few blocks per call
    while scrubber.passes == 0:
        assert scrubber.run_for(1.0) > 0
    assert scrubber.checked == total and scrubber.damaged == 1
    scrubber.run_for(1e6)  # the next pass starts again at the first block
    assert scrubber.passes == 2 and scrubber.checked == 2 * total and scrubber.damaged == 2


def test_a_damaged_counters_record_is_recomputed_and_writes_go_on(store):
    saved = _fill(store, count=3)
    expected = {key: store.stats()[key] for key in ("sessions", "chunks", "stored_bytes", "logical_bytes")}
    _flip_value(store, "meta", b"counters", offset=2)  # the JSON no longer parses
    assert {key: store.stats()[key] for key in expected} == expected  # derived data: recomputed
    store.save("t", "after", TOY_SPEC, np.arange(9000, 9040), pieces_for(store, random_layers(TOY_SPEC, 40, seed=5)))
    assert store.stats()["sessions"] == 4
    _, out = restored(store, "s1")
    assert same(out, saved["s1"])
