"""The durable bottom of the store: one LMDB environment per process.

Sub-databases:
    sessions  tenant \\0 session_id        -> session record (codec.encode_session)
    blocks    chunk key (16) + layer (BE16) -> block record (codec.encode_block)
    refs      chunk key (16)                -> refcount u32, layers u32, record bytes u64
    ttl       expires_at_ms (BE64) + session key -> b""
    meta      b"counters" / b"schema" / b"tenant_usage" -> small JSON
    aux       session key \x01 name         -> data attached to a session (codec.encode_aux)
    usage     tenant                        -> JSON {sessions, stored_bytes, logical_bytes}

Sub-databases are created when missing, so an environment written by an older version opens
(the store then fills ``usage`` once, see SessionStore.upgrade_usage).

Every change is one write transaction (a session and its blocks commit together or not at
all), committed with fsync in durable mode. The map starts small and doubles when full, up to a
hard ceiling; at the ceiling (or when the disk is full) writes fail with CapacityExceeded and the
transaction is rolled back, leaving earlier data intact. Resizing needs every transaction of the
process closed, so reads hold a shared lock and a resize takes it exclusively.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb

from kvstore.errors import CapacityExceeded, Unavailable

log = logging.getLogger("kvmem.lmdb")
T = TypeVar("T")
SCHEMA_VERSION = 1
_DISK_FULL_TEXTS = ("No space left", "Input/output error")


@dataclass(frozen=True)
class LmdbConfig:
    path: Path
    map_bytes: int = 1 << 30  # initial map size; grows by doubling
    max_map_bytes: int = 64 << 30  # hard ceiling: writes past it get RESOURCE_EXHAUSTED
    durable: bool = True  # fsync every commit; False = OS decides when (faster, loses on power cut)
    max_readers: int = 512


class _SharedExclusiveLock:
    """Many readers or one exclusive holder (used only to resize the map)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class LmdbBackend:
    """Owns the LMDB environment: short read transactions, serialized write transactions."""

    DBS = ("sessions", "blocks", "refs", "ttl", "meta", "aux", "usage")

    def __init__(self, config: LmdbConfig):
        if config.map_bytes > config.max_map_bytes:
            raise ValueError(f"lmdb map_bytes {config.map_bytes} exceeds max_map_bytes {config.max_map_bytes}")
        self.config = config
        config.path.mkdir(parents=True, exist_ok=True)
        existing = (config.path / "data.mdb").stat().st_size if (config.path / "data.mdb").exists() else 0
        self._map_bytes = max(config.map_bytes, existing)  # never map less than the file holds
        self.env = lmdb.open(
            str(config.path),
            map_size=self._map_bytes,
            subdir=True,
            max_dbs=len(self.DBS),
            readahead=False,
            sync=config.durable,
            metasync=config.durable,
            writemap=False,
            max_readers=config.max_readers,
            lock=True,
        )
        self.env.reader_check()  # clear reader slots left by a killed process
        self.db = {name: self.env.open_db(name.encode()) for name in self.DBS}
        self._write_lock = threading.Lock()
        self._resize_lock = _SharedExclusiveLock()
        self._closed = False
        self._check_schema()

    def _check_schema(self) -> None:
        def check(txn: lmdb.Transaction) -> None:
            raw = txn.get(b"schema", db=self.db["meta"])
            if raw is None:
                txn.put(b"schema", json.dumps({"version": SCHEMA_VERSION}).encode(), db=self.db["meta"])
            elif json.loads(raw)["version"] != SCHEMA_VERSION:
                raise Unavailable(f"LMDB at {self.config.path} has schema {json.loads(raw)['version']}, this kvmem needs {SCHEMA_VERSION}")

        self.write(check)

    @property
    def map_bytes(self) -> int:
        return self._map_bytes

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read-only transaction (buffers=True: values are views valid inside only)."""
        self._require_open()
        with self._resize_lock.shared():
            with self.env.begin(buffers=True) as txn:
                yield txn

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn(txn)`` in one write transaction and commit it (fsync'd when durable).

        If the map fills up, the transaction is rolled back, the map doubled (up to the ceiling)
        and ``fn`` run again from scratch, so ``fn`` must not have side effects outside ``txn``.
        """
        self._require_open()
        with self._write_lock:
            while True:
                try:
                    with self._resize_lock.shared():
                        with self.env.begin(write=True) as txn:
                            return fn(txn)
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.Error as exc:
                    # A full disk surfaces as ENOSPC, or as EIO from the commit's page writes.
                    if isinstance(exc, lmdb.DiskError) or any(text in str(exc) for text in _DISK_FULL_TEXTS):
                        raise CapacityExceeded(
                            f"disk write failed ({exc}): the disk under {self.config.path} is full or failing; "
                            "nothing of this write was stored; free space or move the data directory"
                        ) from exc
                    raise
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise CapacityExceeded(f"disk full under {self.config.path}; free space or move the data directory") from exc
                    raise

    def _grow(self) -> None:
        ceiling = self.config.max_map_bytes
        if self._map_bytes >= ceiling:
            raise CapacityExceeded(
                f"LMDB store is at its ceiling of {ceiling} bytes; delete or compact sessions, "
                "or raise store.lmdb_max_map_bytes"
            )
        new_size = min(self._map_bytes * 2, ceiling)
        with self._resize_lock.exclusive():
            self.env.set_mapsize(new_size)
        log.info("lmdb map grown", extra={"fields": {"from_bytes": self._map_bytes, "to_bytes": new_size}})
        self._map_bytes = new_size

    def used_bytes(self) -> int:
        """Bytes of pages in use (all sub-databases, plus the two meta pages)."""
        with self.read() as txn:
            total = 0
            for db in self.db.values():
                stat = txn.stat(db)
                total += (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * stat["psize"]
            return total

    def _require_open(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed (server shutting down); retry against a running server")

    def sync(self) -> None:
        if not self._closed:
            self.env.sync(True)

    def close(self) -> None:
        """Flush and close; waits for the writer to finish. Idempotent."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._resize_lock.exclusive():
                self.env.sync(True)
                self.env.close()

