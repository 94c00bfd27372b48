"""The embedded default backend: one LMDB environment per process (``kvstore.backend``).

Every space of ``kvstore.backend.SPACES`` is an LMDB sub-database, created when missing, so an
environment written by an older version opens.

Writes go through one writer thread (group commit): concurrent ``write`` calls queued while a
commit is running are applied together, each in its own nested transaction (so one that raises
is rolled back alone), under one outer transaction and so one fsync. A caller returns only after
the outer commit, so OK still means durable.

The map starts small and doubles when full, up to a hard ceiling; at the ceiling (or when the
disk is full) writes fail with CapacityExceeded and the transaction is rolled back, leaving
earlier data intact. Resizing needs every transaction of the process closed, so reads hold a
shared lock and a resize takes it exclusively.

LMDB pages carry no checksums. Errors LMDB raises on a damaged file (a page it cannot find, a
corrupted B-tree, a bad meta page) surface as CorruptData naming the file; kvmem's own records
carry checksums (``kvstore.codec``) and the per-tenant catalogue check (``kvstore.catalog``)
tells a damaged catalogue from a short one.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import queue
import struct
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import lmdb

from kvstore.backend import SPACES
from kvstore.errors import CapacityExceeded, CorruptData, Unavailable

log = logging.getLogger("kvmem.lmdb")
T = TypeVar("T")
SCHEMA_VERSION = 1
_DISK_FULL_TEXTS = ("No space left", "Input/output error")
# what LMDB raises when the file itself is damaged
_DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.BadValsizeError, lmdb.PanicError,
                  lmdb.VersionMismatchError, lmdb.BadChecksumError, lmdb.IncompatibleError,
                  lmdb.BadTxnError)  # BadTxnError: LMDB swallowed a page-not-found while refreshing a sub-database
_META = struct.Struct("<IIQQ")  # magic, version, address, mapsize: at the start of each meta page's MDB_meta
_META_TXNID = 16 + 128  # page header (16) + magic, version, address, mapsize, dbs[2], last_pg (128): txnid
_LMDB_MAGIC = 0xBEEFC0DE
_MAX_BATCH = 64  # write requests per group commit
_MAX_BATCH_BYTES = 16 << 20  # block bytes per group commit (dirty pages are held in memory until it)


@dataclass(frozen=True)
class LmdbConfig:
    path: Path
    map_bytes: int = 1 << 30  # initial map size; grows by doubling
    max_map_bytes: int = 64 << 30  # hard ceiling: writes past it get RESOURCE_EXHAUSTED
    durable: bool = True  # fsync every commit; False = OS decides when (faster, loses on power cut)
    max_readers: int = 512
    readonly: bool = False  # verify / backup / salvage source: never writes, runs no writer


def damage(path: Path, exc: Exception) -> CorruptData:
    return CorruptData(
        f"the LMDB file {path / 'data.mdb'} is damaged ({type(exc).__name__}: {exc}); "
        f"run `kvmem verify --data-dir {path.parent}` to see what is readable and `kvmem salvage` to copy it out, or restore a backup"
    )


_MADV_DONTNEED = 4
_GATHER_S = 0.0005  # how long the writer waits for more writes when other threads are writing
_RECENT_S = 0.01  # a thread that wrote this recently counts as writing
_DROP_INTERVAL_S = 0.05  # at most this often, the writer unmaps data.mdb's pages after a commit


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check_meta_pages(data_file: Path) -> str | None:
    """What is wrong with the two meta pages of ``data_file`` (None: they agree).

    LMDB keeps two meta pages and writes the new root of each commit into page ``txnid & 1``;
    they carry no checksum. A damaged transaction id makes LMDB pick an older root and serve the
    store as it was one commit earlier, silently; so both pages must have the magic, the same
    version, and transaction ids that are adjacent and on the page their parity names."""
    with open(data_file, "rb") as handle:
        head = handle.read(16 + 48)
        if len(head) < 16 + 48:
            return f"it is {len(head)} bytes long, shorter than an LMDB meta page"
        page_size = struct.unpack_from("<I", head, 16 + 24)[0]  # mm_dbs[FREE_DBI].md_pad holds the page size
        if page_size not in (4096, 8192, 16384, 32768, 65536):
            return f"its first meta page names a page size of {page_size}"
        handle.seek(0)
        pages = handle.read(2 * page_size)
    if len(pages) < 2 * page_size:
        return "it is shorter than its two meta pages"
    metas = []
    for index in range(2):
        base = index * page_size
        magic, version, _, _ = _META.unpack_from(pages, base + 16)
        txnid = struct.unpack_from("<Q", pages, base + _META_TXNID)[0]
        if magic != _LMDB_MAGIC:
            return f"meta page {index} has a bad magic ({magic:#x})"
        metas.append((version, txnid))
    (v0, t0), (v1, t1) = metas
    if v0 != v1:
        return f"its meta pages disagree on the format version ({v0} / {v1})"
    if (t0, t1) == (0, 0):
        return None
    if t0 % 2 or (t1 % 2 == 0) or abs(t0 - t1) != 1:
        return f"its meta pages hold transaction ids {t0} and {t1}, which no commit writes (one of them is damaged)"
    return None


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


class LmdbTxn:
    """``kvstore.backend.WriteTxn`` over one LMDB transaction (read-only or write)."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict, path: Path):
        self._txn = txn
        self._dbs = dbs
        self._path = path

    def get(self, space: str, key: bytes):
        try:
            return self._txn.get(key, db=self._dbs[space])
        except _DAMAGE_ERRORS as exc:
            raise damage(self._path, exc) from exc

    def scan(self, space: str, start: bytes = b"", prefix: bytes = b"", values: bool = True):
        try:
            cursor = self._txn.cursor(db=self._dbs[space])
            if not cursor.set_range(max(start, prefix)):
                return
            while True:
                key = bytes(cursor.key())
                if not key.startswith(prefix):
                    return
                yield key, (cursor.value() if values else None)
                if not cursor.next():
                    return
        except _DAMAGE_ERRORS as exc:
            raise damage(self._path, exc) from exc

    def count(self, space: str) -> int:
        try:
            return self._txn.stat(self._dbs[space])["entries"]
        except _DAMAGE_ERRORS as exc:
            raise damage(self._path, exc) from exc

    def put(self, space: str, key: bytes, value) -> None:
        self._txn.put(key, value, db=self._dbs[space])

    def put_if_absent(self, space: str, key: bytes, value) -> bool:
        return self._txn.put(key, value, db=self._dbs[space], overwrite=False)

    def delete(self, space: str, key: bytes) -> bool:
        return self._txn.delete(key, db=self._dbs[space])

    def clear(self, space: str) -> None:
        self._txn.drop(self._dbs[space], delete=False)


class _Request:
    """One queued write; ``wait()`` returns its result once it is committed (or raises)."""

    __slots__ = ("fn", "size", "result", "error", "done")

    def __init__(self, fn: Callable, size: int):
        self.fn, self.size = fn, size
        self.result = self.error = None
        self.done = threading.Event()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class LmdbBackend:
    """Owns the LMDB environment: short read transactions, group-committed write transactions."""

    name = "lmdb"
    DBS = SPACES

    def __init__(self, config: LmdbConfig):
        if config.map_bytes > config.max_map_bytes:
            raise ValueError(f"lmdb map_bytes {config.map_bytes} exceeds max_map_bytes {config.max_map_bytes}")
        self.config = config
        data_file = config.path / "data.mdb"
        if config.readonly and not data_file.exists():
            raise Unavailable(f"no kvmem store at {config.path} (data.mdb is missing)")
        config.path.mkdir(parents=True, exist_ok=True)
        existing = data_file.stat().st_size if data_file.exists() else 0
        self.meta_problem = check_meta_pages(data_file) if existing else None
        if self.meta_problem is not None and not config.readonly:  # read-only (verify, salvage) reports it instead
            raise damage(config.path, CorruptData(self.meta_problem))
        self._map_bytes = max(config.map_bytes, existing)  # never map less than the file holds
        self._closed = False
        try:
            self.env = lmdb.open(
                str(config.path), map_size=self._map_bytes, subdir=True, max_dbs=len(self.DBS), readahead=False,
                sync=config.durable, metasync=config.durable, writemap=False, max_readers=config.max_readers,
                lock=True, readonly=config.readonly,
            )
        except (lmdb.LockError, lmdb.ReadersFullError):
            raise
        except lmdb.Error as exc:  # a damaged or foreign file (bad magic, version, meta page)
            raise damage(config.path, exc) from exc
        try:
            if not config.readonly:
                self.env.reader_check()  # clear reader slots left by a killed process
            self.db = self._open_dbs(fresh=existing == 0)
        except (lmdb.Error, CorruptData) as exc:
            self.env.close()
            raise damage(config.path, exc) from exc
        self._resize_lock = _SharedExclusiveLock()
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._last_drop = 0.0
        self._map_regions: list[tuple[int, int]] | None = None  # where data.mdb is mapped (drop_mapped_pages)
        self._writers_seen: dict[int, float] = {}  # thread -> when it last submitted a write
        self.commits = 0  # outer (fsync'd) commits, for tests and stats
        self.batched = 0  # write requests those commits carried
        if not config.readonly:
            self._extend_file()
            self._writer = threading.Thread(target=self._write_loop, name="kvmem-lmdb-writer", daemon=True)
            self._writer.start()
            try:
                self._check_schema(fresh=existing == 0)
            except BaseException:
                self.close()
                raise

    def _open_dbs(self, fresh: bool) -> dict:
        """Open every space. In an existing file the ``meta`` space must be there: if LMDB cannot
        find it, the main B-tree is damaged, and creating empty spaces would serve an empty store."""
        with self.env.begin() as txn:
            present = {bytes(key).decode("utf-8", "replace") for key, _ in txn.cursor()}
        if not fresh and "meta" not in present:
            raise CorruptData("its main B-tree does not lead to kvmem's spaces (the meta space is missing)")
        if self.config.readonly:
            return {name: self.env.open_db(name.encode(), create=False) for name in self.DBS if name in present}
        return {name: self.env.open_db(name.encode()) for name in self.DBS}

    def _extend_file(self) -> None:
        """Make data.mdb as long as the map (sparse: no disk used). LMDB trusts the sizes in its
        pages; a damaged size then reads zeros, which fail kvmem's checks, instead of running past
        the end of the file (SIGBUS)."""
        data_file = self.config.path / "data.mdb"
        try:
            if data_file.stat().st_size < self._map_bytes:
                os.truncate(data_file, self._map_bytes)
        except OSError as exc:  # not fatal: only the crash protection is lost
            log.warning("could not extend data.mdb to the map size", extra={"fields": {"error": str(exc)}})

    def _check_schema(self, fresh: bool) -> None:
        def check(txn: LmdbTxn) -> None:
            raw = txn.get("meta", b"schema")
            if raw is None:
                if not fresh:
                    raise CorruptData("its schema record is missing")
                txn.put("meta", b"schema", json.dumps({"version": SCHEMA_VERSION}).encode())
                return
            try:
                version = json.loads(bytes(raw))["version"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptData(f"its schema record is unreadable ({exc!r})") from None
            if version != SCHEMA_VERSION:
                raise Unavailable(f"LMDB at {self.config.path} has schema {version}, this kvmem needs {SCHEMA_VERSION}")

        try:
            self.write(check)
        except CorruptData as exc:
            raise damage(self.config.path, exc) from exc

    @property
    def map_bytes(self) -> int:
        return self._map_bytes

    @contextlib.contextmanager
    def read(self) -> Iterator[LmdbTxn]:
        """A short read-only transaction (values are views valid inside only)."""
        self._require_open()
        with self._resize_lock.shared():
            try:
                with self.env.begin(buffers=True) as txn:
                    yield _ReadOnly(txn, self.db, self.config.path)
            except _DAMAGE_ERRORS as exc:
                raise damage(self.config.path, exc) from exc

    def write(self, fn: Callable[[LmdbTxn], T], size: int = 0) -> T:
        """Run ``fn(txn)`` atomically and return once it is committed (fsync'd when durable).

        ``size`` is a hint of the bytes ``fn`` writes (batches are bounded by it). If the map
        fills up, the batch is rolled back, the map doubled (up to the ceiling) and ``fn`` run
        again from scratch, so ``fn`` must not have side effects outside ``txn``.
        """
        return self.submit(fn, size).wait()

    def submit(self, fn: Callable[[LmdbTxn], T], size: int = 0) -> _Request:
        """Queue ``fn`` like ``write`` without waiting: ``.wait()`` on the result does."""
        self._require_open()
        if self.config.readonly:
            raise Unavailable(f"the store at {self.config.path} is open read-only")
        if threading.current_thread() is self._writer:
            raise RuntimeError("LmdbBackend.write called from inside a write")
        request = _Request(fn, size)
        self._writers_seen[threading.get_ident()] = time.monotonic()
        self._queue.put(request)
        return request

    def _recent_writers(self) -> int:
        """Threads that submitted a write in the last _RECENT_S (a hint of how many to batch)."""
        horizon = time.monotonic() - _RECENT_S
        seen = self._writers_seen
        for ident in [ident for ident, at in list(seen.items()) if at < horizon]:
            seen.pop(ident, None)
        return len(seen)

    def put_blocks(self, blocks: Iterable[tuple[bytes, bytes]], staged: Iterable[tuple[bytes, bytes]] = ()) -> _Request:
        """Queue put-if-absent of ``blocks`` and puts of ``staged`` entries as one write;
        ``.wait()`` returns how many blocks were new."""
        blocks, staged = list(blocks), list(staged)

        def apply(txn: LmdbTxn) -> int:
            new = sum(txn.put_if_absent("blocks", key, data) for key, data in blocks)
            for key, value in staged:
                txn.put("staged", key, value)
            return new

        return self.submit(apply, size=sum(len(data) for _, data in blocks))

    # ------------------------------------------------------------------ the writer thread
    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, size = [first], first.size
            expected = self._recent_writers()
            while len(batch) < _MAX_BATCH and size < _MAX_BATCH_BYTES:
                try:  # when several threads write, wait a moment for the others: one fsync for all
                    nxt = self._queue.get(timeout=_GATHER_S) if len(batch) < expected else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
                size += nxt.size
            try:
                self._commit(batch)
            except BaseException as exc:  # noqa: BLE001 - every caller must be woken
                for request in batch:
                    if request.error is None:
                        request.error = exc
            finally:
                for request in batch:
                    request.done.set()

    def _commit(self, batch: list[_Request]) -> None:
        while True:
            for request in batch:
                request.result = request.error = None
            try:
                with self._resize_lock.shared():
                    with self.env.begin(write=True) as outer:
                        for request in batch:
                            child = self.env.begin(write=True, parent=outer, buffers=True)
                            try:
                                request.result = request.fn(LmdbTxn(child, self.db, self.config.path))
                            except lmdb.MapFullError:
                                child.abort()
                                raise
                            except Exception as exc:  # noqa: BLE001 - this request's own failure
                                child.abort()
                                request.error = exc
                            else:
                                child.commit()
                self.commits += 1
                self.batched += len(batch)
                now = time.monotonic()
                if now - self._last_drop >= _DROP_INTERVAL_S:  # writing into reused pages maps them too
                    self._last_drop = now
                    self.drop_mapped_pages()
                return
            except lmdb.MapFullError:
                self._grow()
            except _DAMAGE_ERRORS as exc:
                raise damage(self.config.path, exc) from exc
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
            self._map_regions = None  # the map moved
        log.info("lmdb map grown", extra={"fields": {"from_bytes": self._map_bytes, "to_bytes": new_size}})
        self._map_bytes = new_size
        self._extend_file()

    # ------------------------------------------------------------------ housekeeping
    def capacity_bytes(self) -> int:
        """The map's ceiling (store.lmdb_max_map_bytes)."""
        return self.config.max_map_bytes

    def used_bytes(self) -> int:
        """Bytes of pages in use (all sub-databases, plus the two meta pages)."""
        with self._resize_lock.shared(), self.env.begin() as txn:
            total = 0
            for db in self.db.values():
                stat = txn.stat(db)
                total += (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * stat["psize"]
            return total

    def drop_mapped_pages(self) -> bool:
        """Unmap data.mdb's pages from this process (madvise MADV_DONTNEED on its read-only
        mapping): LMDB touches every page of a large value it reads or deletes, and the kernel
        maps whole page-cache folios, so a big abort or delete would leave gigabytes of
        file-backed RSS. The pages stay in the page cache; the next access maps them again.
        Returns False where this cannot be done (no /proc, no libc)."""
        try:
            libc = _libc()
            with self._resize_lock.shared():  # a resize moves the map: never advise an address it left
                if self._closed:
                    return False
                if self._map_regions is None:  # found once per map (see _grow)
                    self._map_regions = self._find_map_regions()
                regions = self._map_regions
                return bool(regions) and all(libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) == 0 for start, length in regions)
        except (OSError, AttributeError, ValueError):
            return False

    def _find_map_regions(self) -> list[tuple[int, int]]:
        """(start, length) of this process's mappings of data.mdb, from /proc/self/maps."""
        target = str((self.config.path / "data.mdb").resolve())
        regions = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith(target):
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    regions.append((start, end - start))
        return regions

    def snapshot(self, destination: Path) -> None:
        """A consistent, compacted copy of the committed state into directory ``destination``
        (one read transaction: writers go on meanwhile). ``destination`` must not exist."""
        destination = Path(destination)
        if destination.exists() and any(destination.iterdir()):
            raise FileExistsError(f"{destination} exists and is not empty; choose a new directory")
        destination.mkdir(parents=True, exist_ok=True)
        self._require_open()
        try:
            with self._resize_lock.shared():
                self.env.copy(str(destination), compact=True)
        except BaseException:
            shutil.rmtree(destination, ignore_errors=True)
            raise

    def _require_open(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed (server shutting down); retry against a running server")

    def sync(self) -> None:
        if not self._closed and not self.config.readonly:
            self.env.sync(True)

    def close(self) -> None:
        """Finish queued writes, flush and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        with self._resize_lock.exclusive():
            if not self.config.readonly:
                self.env.sync(True)
            self.env.close()


class _ReadOnly(LmdbTxn):
    def put(self, space, key, value):  # pragma: no cover - guarded by the type
        raise Unavailable("read transaction")

    put_if_absent = delete = clear = put  # type: ignore[assignment]
