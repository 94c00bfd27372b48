"""Streaming writes (kvstore.staging) and group commit: blocks are written as they arrive,
invisible until the session record commits; aborted and crashed writes leave nothing behind."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from kvstore.errors import CapacityExceeded, Conflict, InvalidRequest
from kvstore.pieces import tensor_raw_view
from kvstore.spec import DTYPE_CODES
from kvstore.store import SessionStore
from tests.conftest import TOY_SPEC, random_layers
from tests.test_store import pieces_for, restored, same

CODE = DTYPE_CODES[TOY_SPEC.torch_dtype]


def _counts(store) -> dict[str, int]:
    with store.backend.read() as txn:
        return {space: txn.count(space) for space in ("blocks", "staged", "refs", "sessions")}


def _add(write, layers, start, end, step=None):
    """Add KV [start, end) of ``layers`` (whose token 0 is session token 0), ``step`` tokens per piece."""
    step = step or (end - start)
    for lo in range(start, end, step):
        hi = min(end, lo + step)
        for layer, (k, v) in enumerate(layers):
            write.add(layer, lo, hi - lo, CODE, memoryview(tensor_raw_view(k[:, lo:hi].contiguous())).cast("B"),
                      memoryview(tensor_raw_view(v[:, lo:hi].contiguous())).cast("B"))


@pytest.fixture
def small_flush(monkeypatch):
    """Flush staged blocks after every block, so a stream writes long before its commit."""
    monkeypatch.setattr("kvstore.staging.FLUSH_BYTES", 1)
    import kvstore.staging as staging

    original = staging.StagedWrite.__init__

    def init(self, *args, **kwargs):
        kwargs["flush_bytes"] = 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(staging.StagedWrite, "__init__", init)


def test_a_streamed_save_is_invisible_until_commit_then_bit_exact(store, small_flush):
    layers = random_layers(TOY_SPEC, 50, seed=1)
    write = store.begin_save("t", "s", TOY_SPEC, np.arange(50))
    _add(write, layers, 0, 50, step=7)  # pieces that do not line up with the 16-token chunks
    counts = _counts(store)
    assert counts["blocks"] > 0 and counts["staged"] > 0  # written before the commit ...
    assert counts["sessions"] == 0 and counts["refs"] == 0 and store.lookup("t", TOY_SPEC, np.arange(50)) == 0  # ... and invisible
    result = write.commit()
    assert result.bytes_written > 0 and _counts(store)["staged"] == 0
    _, out = restored(store, "s")
    assert same(out, layers)


def test_an_aborted_stream_leaves_nothing(store, small_flush):
    before = _counts(store)
    write = store.begin_save("t", "s", TOY_SPEC, np.arange(64))
    _add(write, random_layers(TOY_SPEC, 64), 0, 48)
    assert _counts(store)["blocks"] > before["blocks"]
    write.abort()
    write.abort()  # idempotent
    assert _counts(store) == before and store.budget.used == 0


def test_a_crashed_stream_is_swept_at_start(store_config, small_flush):
    store = SessionStore.open(store_config)
    keep = random_layers(TOY_SPEC, 32, seed=2)
    store.save("t", "kept", TOY_SPEC, np.arange(32), pieces_for(store, keep))
    before = _counts(store)
    write = store.begin_save("t", "lost", TOY_SPEC, np.arange(100, 164))
    _add(write, random_layers(TOY_SPEC, 64), 0, 48)  # never committed, never aborted: a crash
    assert _counts(store)["staged"] > 0
    store.backend.close()  # the process dies with the stream open
    reopened = SessionStore.open(store_config)
    assert _counts(reopened) == before  # the start-up sweep removed the staged blocks and entries
    _, out = restored(reopened, "kept")
    assert same(out, keep)
    reopened.close()


def test_two_streams_writing_one_prefix_never_delete_each_others_blocks(store, small_flush):
    layers = random_layers(TOY_SPEC, 48, seed=3)
    first = store.begin_save("t", "a", TOY_SPEC, np.arange(48))
    second = store.begin_save("t", "b", TOY_SPEC, np.arange(48))
    _add(first, layers, 0, 48)
    _add(second, layers, 0, 48)
    first.abort()  # the other stream still has the same chunks staged
    second.commit()
    _, out = restored(store, "b")
    assert same(out, layers)
    assert _counts(store)["staged"] == 0


def test_a_chunk_freed_while_a_stream_stages_it_is_kept_for_that_stream(store, small_flush):
    layers = random_layers(TOY_SPEC, 32, seed=4)
    write = store.begin_save("t", "late", TOY_SPEC, np.arange(32))
    _add(write, layers, 0, 32)  # staged before the other session commits the same chunks
    store.save("t", "early", TOY_SPEC, np.arange(32), pieces_for(store, layers))
    store.delete("t", "early")  # last reference gone, but a stream has the chunks staged
    write.commit()
    _, out = restored(store, "late")
    assert same(out, layers)


def test_a_shared_chunk_deleted_before_the_commit_is_conflict_and_a_retry_works(store):
    layers = random_layers(TOY_SPEC, 32, seed=5)
    store.save("t", "first", TOY_SPEC, np.arange(32), pieces_for(store, layers))
    write = store.begin_save("t", "second", TOY_SPEC, np.arange(32))  # finds every chunk stored: sends nothing to disk
    _add(write, layers, 0, 32)
    store.delete("t", "first")
    with pytest.raises(Conflict, match="send the write again"):
        write.commit()
    assert _counts(store)["sessions"] == 0
    store.save("t", "second", TOY_SPEC, np.arange(32), pieces_for(store, layers))
    _, out = restored(store, "second")
    assert same(out, layers)


def test_overlaps_gaps_and_early_ends_are_refused_and_store_nothing(store):
    layers = random_layers(TOY_SPEC, 40)
    before = _counts(store)
    write = store.begin_save("t", "s", TOY_SPEC, np.arange(40))
    _add(write, layers, 0, 20)
    with pytest.raises(InvalidRequest, match="overlap at token 10"):
        _add(write, layers, 10, 12)
    write.abort()
    write = store.begin_save("t", "s", TOY_SPEC, np.arange(40))
    _add(write, layers, 0, 30)
    with pytest.raises(InvalidRequest, match=r"cover tokens \[0, 30\) of \[0, 40\)"):
        write.commit()
    assert _counts(store) == before and store.budget.used == 0


def test_the_inflight_budget_refuses_instead_of_growing(store_config):
    store = SessionStore.open(dataclasses.replace(store_config, inflight_bytes=1 << 20))
    spec = dataclasses.replace(TOY_SPEC, num_kv_heads=8, head_dim=64)  # 16 tokens x 4 layers = 64 KiB a chunk
    write = store.begin_save("t", "s", spec, np.arange(2048))
    k = torch.zeros(8, 1, 64)
    raw = memoryview(tensor_raw_view(k)).cast("B")
    with pytest.raises(CapacityExceeded, match="store.inflight_bytes"):
        for start in range(0, 2048, 16):  # the first token of every chunk: nothing completes, everything is held
            for layer in range(spec.num_layers):
                write.add(layer, start, 1, CODE, raw, raw)
    assert store.budget.used <= 1 << 20
    write.abort()
    assert store.budget.used == 0
    other = store.begin_save("t", "small", spec, np.arange(16))  # the server keeps accepting others
    _add(other, random_layers(spec, 16), 0, 16)
    other.commit()
    store.close()


def test_an_append_completing_a_partial_tail_chunk_streams(store, small_flush):
    layers = random_layers(TOY_SPEC, 45, seed=6)
    store.save("t", "s", TOY_SPEC, np.arange(20), pieces_for(store, [(k[:, :20], v[:, :20]) for k, v in layers]))
    write = store.begin_append("t", "s", TOY_SPEC, np.arange(20, 45))
    _add(write, layers, 20, 45, step=5)
    write.commit()
    _, out = restored(store, "s")
    assert same(out, layers)
    assert store.lookup("t", TOY_SPEC, np.arange(45)) == 45


def test_concurrent_writers_share_fsyncs(store):
    """Group commit: writes queued while a commit runs go out together in one commit."""
    backend = store.backend
    release = threading.Event()
    entered = threading.Event()

    def slow(txn):
        entered.set()
        release.wait(10)
        txn.put("meta", b"slow", b"1")

    holder = threading.Thread(target=backend.write, args=(slow,))
    holder.start()
    entered.wait(10)
    before = backend.commits
    threads = [threading.Thread(target=backend.write, args=(lambda txn, i=i: txn.put("meta", b"w%d" % i, b"1"),)) for i in range(5)]
    for thread in threads:
        thread.start()
    while backend._queue.qsize() < 5:  # all five queued behind the running commit
        threading.Event().wait(0.01)
    release.set()
    for thread in [holder, *threads]:
        thread.join()
    assert backend.commits - before == 2  # the slow one, then the five in one fsync
    with backend.read() as txn:
        assert all(txn.get("meta", b"w%d" % i) is not None for i in range(5))


def test_the_periodic_sweep_spares_open_streams_and_removes_abandoned_ones(store_config, small_flush):
    store = SessionStore.open(dataclasses.replace(store_config, staged_max_age_seconds=0))
    before = _counts(store)
    open_write = store.begin_save("t", "open", TOY_SPEC, np.arange(64))
    _add(open_write, random_layers(TOY_SPEC, 64, seed=8), 0, 48)
    abandoned = store.begin_save("t", "gone", TOY_SPEC, np.arange(500, 564))
    _add(abandoned, random_layers(TOY_SPEC, 64, seed=9), 0, 48)
    abandoned.staged._release()  # its stream vanished without an abort (the owner is no longer live)
    entries, blocks = store.sweep_staged()
    assert entries > 0 and blocks > 0
    layers = random_layers(TOY_SPEC, 64, seed=8)
    _add(open_write, layers, 48, 64)
    open_write.commit()  # the open stream's staged blocks were spared
    _, out = restored(store, "open")
    assert same(out, layers)
    store.delete("t", "open")
    assert _counts(store) == before
    store.close()
