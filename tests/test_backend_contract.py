"""The backend contract (kvstore.backend): every backend must pass this suite unchanged.

A backend is added by appending a factory to BACKENDS: ``factory(path, request) -> backend``
opening (or reopening) the store under ``path`` (``request`` reaches session fixtures such as
the Redis Cluster).
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvstore.errors import Unavailable
from kvstore.lmdb_backend import LmdbBackend, LmdbConfig
from kvstore.redis_backend import RedisBackend, RedisConfig


def lmdb_backend(path: Path, request):
    return LmdbBackend(LmdbConfig(path / "lmdb", map_bytes=1 << 20, max_map_bytes=64 << 20))


def redis_cluster_backend(path: Path, request):
    """A namespace of its own per test (named by its directory) on the shared 3+3 cluster."""
    cluster = request.getfixturevalue("redis_cluster")
    return RedisBackend(RedisConfig(cluster.url, namespace=f"contract-{abs(hash(str(path))):x}", min_replicas=1, maintenance_seconds=0))


BACKENDS = {"lmdb": lmdb_backend, "redis-cluster": redis_cluster_backend}


@pytest.fixture(params=sorted(BACKENDS))
def factory(request, tmp_path):
    opened = []

    def open_backend():
        backend = BACKENDS[request.param](tmp_path, request)
        opened.append(backend)
        return backend

    yield open_backend
    for backend in opened:
        backend.close()


def _get(backend, space, key):
    with backend.read() as txn:
        raw = txn.get(space, key)
        return None if raw is None else bytes(raw)


def test_put_get_delete_and_put_if_absent(factory):
    backend = factory()
    backend.write(lambda txn: txn.put("sessions", b"a\x00s", b"one"))
    assert _get(backend, "sessions", b"a\x00s") == b"one"
    assert _get(backend, "blocks", b"a\x00s") is None  # spaces are separate
    assert backend.write(lambda txn: txn.put_if_absent("sessions", b"a\x00s", b"two")) is False
    assert _get(backend, "sessions", b"a\x00s") == b"one"  # put-if-absent never overwrites
    assert backend.write(lambda txn: txn.delete("sessions", b"a\x00s")) is True
    assert backend.write(lambda txn: txn.delete("sessions", b"a\x00s")) is False
    assert _get(backend, "sessions", b"a\x00s") is None


def test_scan_is_ordered_by_key_honours_start_and_prefix_and_counts(factory):
    backend = factory()
    keys = [b"b\x00" + bytes([i]) for i in (5, 1, 9, 3)] + [b"a\x00z", b"c\x00a"]

    def fill(txn):
        for key in keys:
            txn.put("sessions", key, key[::-1])

    backend.write(fill)
    with backend.read() as txn:
        everything = [key for key, _ in txn.scan("sessions")]
        tenant_b = [(key, bytes(value)) for key, value in txn.scan("sessions", prefix=b"b\x00")]
        from_three = [key for key, _ in txn.scan("sessions", start=b"b\x00\x03", prefix=b"b\x00")]
        keys_only = [value for _, value in txn.scan("sessions", prefix=b"b\x00", values=False)]
        assert txn.count("sessions") == len(keys)
        assert list(txn.scan("sessions", prefix=b"zz")) == []
    assert everything == sorted(keys)
    assert [key for key, _ in tenant_b] == sorted(k for k in keys if k.startswith(b"b\x00"))
    assert all(value == key[::-1] for key, value in tenant_b)
    assert from_three == [b"b\x00\x03", b"b\x00\x05", b"b\x00\x09"]
    assert keys_only == [None] * 4


def test_a_write_that_raises_stores_nothing(factory):
    backend = factory()
    backend.write(lambda txn: txn.put("meta", b"kept", b"1"))

    def half(txn):
        txn.put("meta", b"kept", b"changed")
        txn.put("meta", b"new", b"2")
        raise ValueError("refused halfway")

    with pytest.raises(ValueError, match="halfway"):
        backend.write(half)
    assert _get(backend, "meta", b"kept") == b"1" and _get(backend, "meta", b"new") is None


def test_a_write_sees_its_own_changes_and_reads_see_a_snapshot(factory):
    backend = factory()
    backend.write(lambda txn: txn.put("meta", b"k", b"old"))

    def read_back(txn):
        txn.put("meta", b"k", b"new")
        return bytes(txn.get("meta", b"k"))

    with backend.read() as snapshot:
        assert backend.write(read_back) == b"new"
        assert bytes(snapshot.get("meta", b"k")) == b"old"  # a read started before the write keeps its view
    assert _get(backend, "meta", b"k") == b"new"


def test_committed_writes_survive_close_and_reopen_bit_exact(factory):
    backend = factory()
    payload = bytes(range(256)) * 4096  # 1 MiB: an LMDB overflow value
    assert backend.put_blocks([(b"k" * 18, payload)], staged=[(b"k" * 32, b"\x00" * 8)]).wait() == 1
    assert backend.put_blocks([(b"k" * 18, b"other")]).wait() == 0  # put-if-absent: the block is immutable
    backend.close()
    reopened = factory()
    assert _get(reopened, "blocks", b"k" * 18) == payload
    assert _get(reopened, "staged", b"k" * 32) == b"\x00" * 8


def test_concurrent_writes_each_stay_atomic(factory):
    backend = factory()
    errors = []

    def writer(index):
        for step in range(20):
            def apply(txn, index=index, step=step):
                txn.put("meta", f"{index}/{step}".encode(), b"x")
                if step == 7:
                    raise KeyError("this one only")
                return step

            try:
                assert backend.write(apply) == step
            except KeyError:
                errors.append((index, step))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with backend.read() as txn:
        stored = {key.decode() for key, _ in txn.scan("meta") if b"/" in key}
    assert sorted(errors) == [(i, 7) for i in range(6)]
    assert stored == {f"{i}/{s}" for i in range(6) for s in range(20) if s != 7}  # a failed write took nothing else with it


def test_clear_empties_one_space(factory):
    backend = factory()
    backend.write(lambda txn: [txn.put("usage", bytes([i]), b"1") for i in range(10)] and txn.put("meta", b"k", b"v"))
    backend.write(lambda txn: txn.clear("usage"))
    with backend.read() as txn:
        assert txn.count("usage") == 0 and bytes(txn.get("meta", b"k")) == b"v"


def test_snapshot_is_a_consistent_copy_while_writes_go_on(factory, tmp_path):
    backend = factory()
    backend.write(lambda txn: [txn.put("sessions", f"t\x00{i:03d}".encode(), b"v") for i in range(100)])
    stop = threading.Event()

    def keep_writing():
        i = 100
        while not stop.is_set():
            backend.write(lambda txn, i=i: txn.put("sessions", f"t\x00{i:03d}".encode(), b"v"))
            i += 1

    thread = threading.Thread(target=keep_writing)
    thread.start()
    try:
        backend.snapshot(tmp_path / "snap" / "lmdb")
    finally:
        stop.set()
        thread.join()
    copy = LmdbBackend(LmdbConfig(tmp_path / "snap" / "lmdb", readonly=True)) if backend.name == "lmdb" else None
    if copy is not None:
        with copy.read() as txn:
            ids = [int(key[2:]) for key, _ in txn.scan("sessions")]
        copy.close()
        assert ids[:100] == list(range(100)) and ids == list(range(len(ids)))  # a prefix of the writes, no holes
    with pytest.raises(FileExistsError):
        backend.snapshot(tmp_path / "snap" / "lmdb")


def test_a_closed_backend_refuses_clearly(factory):
    backend = factory()
    backend.close()
    with pytest.raises(Unavailable, match="closed"):
        backend.write(lambda txn: txn.put("meta", b"k", b"v"))
    with pytest.raises(Unavailable, match="closed"):
        with backend.read():
            pass


def test_capacity_is_unknown_or_holds_what_is_used(factory):
    backend = factory()
    backend.write(lambda txn: txn.put("sessions", b"k", b"v" * 1000))
    capacity, used = backend.capacity_bytes(), backend.used_bytes()
    assert used > 0
    assert capacity == 0 or capacity >= used
