"""The shared backend: Redis Cluster (or one Redis / Valkey server) behind ``kvstore.backend``.

Layout (docs/scale-out.md has the reasoning):

* **Blocks** are immutable, content-addressed values under ``<ns>:b:<hex storage key>``: no hash
  tag, so they spread over every slot and every primary. They are written with ``SET NX``
  before the commit that references them, and read with ``GET``.
* **Everything else** (session records, refcounts, TTL index, usage, aux records, staging marks,
  meta) lives under the hash tag ``{<ns>}``, so in one slot: each space is a hash (key ->
  value) plus a sorted set of its keys (scans in byte order). A commit is one Lua script
  (``kvstore.redis_scripts.COMMIT``) on that slot's primary: atomic, and checked against what the
  transaction read (optimistic concurrency; ``write`` runs ``fn`` again on a conflict).
* **Snapshot reads** are multi-version: commits keep undo entries for a retention period, so a
  read transaction sees the store as of its start (``kvstore.redis_scripts``).
* **Deleting blocks** is deferred: a commit that drops a chunk's last reference marks its blocks
  *doomed*; a sweep deletes them after ``block_grace_seconds`` if no record references them and
  no stream stages them by then. Sweep epochs per chunk stop a commit from referencing a block
  that a sweep is deleting. A mark pass finds blocks nothing marked (a writer that died between
  ``SET NX`` and its commit) and dooms them the same way.
* **Durability**: with ``min_replicas`` > 0, every block write and every commit is followed on
  the same connection by ``WAIT min_replicas``; a write returns only when that many replicas
  have it. Fewer acknowledgements in time is UNAVAILABLE (the outcome is unknown: retry).

Values carry kvmem's own checksums (``kvstore.codec``), verified by the store on every read.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import redis

from kvstore.backend import SPACES, Receipts, merge_receipts
from kvstore.chunking import KEY_BYTES
from kvstore.errors import Unavailable
from kvstore.redis_nodes import NodeSettings, Nodes
from kvstore.redis_scripts import (CLAIM_SWEEP, COMMIT, FINISH_SWEEP, FIXED_KEYS, MARK_ORPHANS, META_SPACES, SNAPSHOT_COUNT,
                                   SNAPSHOT_GET, SNAPSHOT_PAGE, TRIM, space_letter)

log = logging.getLogger("kvmem.redis")
T = TypeVar("T")
_PAGE = 256  # keys per scan page
_MISSING = object()
_ANY_VERSION = 1 << 52  # a commit that read nothing: never too old, never in conflict


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379"
    namespace: str = "kvmem"  # every key starts with it: several stores can share one cluster
    min_replicas: int = 0  # WAIT for this many replica acknowledgements before a write returns
    timeout_seconds: float = 5.0  # one command; also the WAIT timeout
    failover_seconds: float = 30.0  # calls retry through a failover this long, then UNAVAILABLE
    snapshot_seconds: float = 300.0  # undo entries kept: a read transaction may last this long
    block_grace_seconds: float = 300.0  # a doomed block is deleted no sooner than this
    maintenance_seconds: float = 5.0  # trim and sweep this often (0: only when called)
    orphan_scan_seconds: float = 3600.0  # mark unreferenced blocks this often (0: only when called)

    def __post_init__(self) -> None:
        if not self.namespace or any(c in self.namespace for c in "{}:") or len(self.namespace) > 64:
            raise ValueError(f"store.redis_namespace must be 1..64 characters without braces or colons, got {self.namespace!r}")
        if not 0 <= self.min_replicas <= 16:
            raise ValueError(f"store.redis_min_replicas must be in 0..16, got {self.min_replicas}")
        for name in ("timeout_seconds", "failover_seconds", "snapshot_seconds", "block_grace_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"store.redis_{name} must be > 0, got {getattr(self, name)}")


class _Pending:
    """A block write in flight: ``wait()`` -> blocks new; ``receipts`` once it is done."""

    def __init__(self, future):
        self._future = future

    def wait(self) -> int:
        return self._future.result()[0]

    @property
    def receipts(self) -> Receipts:
        return self._future.result()[1]


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key that starts with ``prefix`` (None: no bound)."""
    trimmed = prefix.rstrip(b"\xff")
    return None if not trimmed else trimmed[:-1] + bytes([trimmed[-1] + 1])


class RedisReadTxn:
    """``kvstore.backend.ReadTxn`` at one snapshot (the commit counter when it began)."""

    def __init__(self, backend: "RedisBackend", version: int):
        self.backend = backend
        self.version = version

    def get(self, space: str, key: bytes):
        if space == "blocks":
            return self.backend.get_block(key)
        return self._snapshot_get(space, key)

    def get_blocks(self, keys: list[bytes]) -> list[bytes | None]:
        """Several blocks in one pipelined round trip per primary (a restore reads a chunk's layers)."""
        return self.backend.get_blocks(keys)

    def _snapshot_get(self, space: str, key: bytes) -> bytes | None:
        field = space_letter(space) + key
        reply = self.backend.meta_script("get", SNAPSHOT_GET, [field, key, self.version])
        if reply[0] == 0:
            raise self.backend.too_old()
        return bytes(reply[2]) if reply[1] == 1 else None

    def scan(self, space: str, start: bytes = b"", prefix: bytes = b"", values: bool = True) -> Iterator[tuple[bytes, bytes | None]]:
        if space == "blocks":
            yield from self.backend.scan_blocks(self, start, prefix, values)
            return
        yield from self._snapshot_scan(space, start, prefix, values)

    def _snapshot_scan(self, space: str, start: bytes, prefix: bytes, values: bool):
        letter = space_letter(space)
        low, high = max(start, prefix), _prefix_end(prefix)
        cursor: bytes | None = None
        before: dict[bytes, tuple[bool, bytes]] = {}  # keys changed since the snapshot -> their state at it
        seen = self.version
        while True:
            lex_min = b"(" + cursor if cursor is not None else b"[" + low
            lex_max = b"(" + high if high is not None else b"+"
            reply = self.backend.meta_script("scan", SNAPSHOT_PAGE, [letter, self.version, seen, lex_min, lex_max, _PAGE, 1 if values else 0])
            if reply[0] == 0:
                raise self.backend.too_old()
            seen, count = int(reply[1]), int(reply[2])
            page = [(bytes(reply[3 + 2 * i]), bytes(reply[4 + 2 * i])) for i in range(count)]
            at = 3 + 2 * count
            for i in range(int(reply[at])):
                key = bytes(reply[at + 1 + 3 * i])
                before.setdefault(key, (reply[at + 2 + 3 * i] == b"1", bytes(reply[at + 3 + 3 * i])))
            full = count == _PAGE
            upper = page[-1][0] if full else None
            rows = [(key, value) for key, value in page if key not in before]
            for key, (existed, value) in before.items():
                if not existed or key < low or (cursor is not None and key <= cursor) or not key.startswith(prefix):
                    continue
                if (upper is not None and key > upper) or (high is not None and key >= high):
                    continue
                rows.append((key, value))
            rows.sort()
            for key, value in rows:
                yield key, (value if values else None)
            if not full:
                return
            cursor = upper

    def count(self, space: str) -> int:
        if space == "blocks":
            return sum(1 for _ in self.backend.scan_blocks(self, b"", b"", False))
        reply = self.backend.meta_script("count", SNAPSHOT_COUNT, [space_letter(space), self.version])
        if reply[0] == 0:
            raise self.backend.too_old()
        return int(reply[1])


class RedisWriteTxn(RedisReadTxn):
    """A write transaction: reads at its snapshot overlaid by its own changes; the reads and
    scans it made are checked at commit (``kvstore.redis_scripts.COMMIT``)."""

    def __init__(self, backend: "RedisBackend", version: int):
        super().__init__(backend, version)
        self.changes: dict[tuple[str, bytes], bytes | None] = {}  # (space, key) -> value (None: deleted)
        self.reads: set[bytes] = set()  # fields read from the snapshot
        self.scans: set[bytes] = set()  # letter + prefix scanned
        self.new_blocks: dict[bytes, bytes] = {}
        self.doomed: set[bytes] = set()

    def get(self, space: str, key: bytes):
        if space == "blocks":
            if key in self.new_blocks:
                return self.new_blocks[key]
            return None if key in self.doomed else self.backend.get_block(key)
        change = self.changes.get((space, key), _MISSING)
        if change is not _MISSING:
            return change
        self.reads.add(space_letter(space) + key)
        return self._snapshot_get(space, key)

    def scan(self, space: str, start: bytes = b"", prefix: bytes = b"", values: bool = True):
        if space == "blocks":
            raise NotImplementedError("scanning blocks inside a write transaction")
        self.scans.add(space_letter(space) + prefix)
        local = {key: value for (s, key), value in self.changes.items() if s == space and key.startswith(prefix) and key >= start}
        stored = self._snapshot_scan(space, start, prefix, values)
        pending = sorted(local.items())
        at = 0
        for key, value in stored:
            while at < len(pending) and pending[at][0] < key:
                if pending[at][1] is not None:
                    yield pending[at][0], (pending[at][1] if values else None)
                at += 1
            if at < len(pending) and pending[at][0] == key:
                if pending[at][1] is not None:
                    yield key, (pending[at][1] if values else None)
                at += 1
                continue
            yield key, value
        for key, value in pending[at:]:
            if value is not None:
                yield key, (value if values else None)

    def count(self, space: str) -> int:
        return sum(1 for _ in self.scan(space, values=False))

    def put(self, space: str, key: bytes, value) -> None:
        if space == "blocks":
            self.new_blocks[key] = bytes(value)
            self.doomed.discard(key)
            return
        self.changes[(space, key)] = bytes(value)

    def put_if_absent(self, space: str, key: bytes, value) -> bool:
        if self.get(space, key) is not None:
            return False
        self.put(space, key, value)
        return True

    def delete(self, space: str, key: bytes) -> bool:
        if space == "blocks":
            existed = self.get(space, key) is not None
            self.new_blocks.pop(key, None)
            self.doomed.add(key)
            return existed
        existed = self.get(space, key) is not None
        self.changes[(space, key)] = None
        return existed

    def clear(self, space: str) -> None:
        if space == "blocks":
            raise NotImplementedError("clearing blocks")
        for key, _ in list(self.scan(space, values=False)):
            self.changes[(space, key)] = None


class RedisBackend:
    """``kvstore.backend.Backend`` over Redis Cluster or one Redis server (see the module doc)."""

    name = "redis"
    DBS = SPACES

    def __init__(self, config: RedisConfig):
        self.config = config
        self.nodes = Nodes(NodeSettings(config.url, config.timeout_seconds, config.failover_seconds))
        tag = "{" + config.namespace + "}"
        self.meta_keys = [f"{tag}:{kind}:{space}".encode() for space in META_SPACES for kind in ("v", "z")]
        self.meta_keys += [f"{tag}:{name}".encode() for name in FIXED_KEYS]
        self._meta_slot_key = self.meta_keys[0]
        self._block_prefix = f"{config.namespace}:b:".encode()
        self._scripts: dict[str, bytes] = {}
        self._write_lock = threading.Lock()
        self._barrier_tags: dict[tuple[str, int], bytes] = {}  # primary -> a hash tag whose slot it serves
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvmem-redis-put")
        self._closed = False
        self.commits = 0
        self.batched = 0
        self.conflicts = 0
        self._stop = threading.Event()
        self._maintainer: threading.Thread | None = None
        self._last_orphan_scan = time.monotonic()
        self._check_reachable()
        if config.maintenance_seconds > 0:
            self._maintainer = threading.Thread(target=self._maintain, name="kvmem-redis-maintain", daemon=True)
            self._maintainer.start()

    # ------------------------------------------------------------------ plumbing
    def _check_reachable(self) -> None:
        reply = self.nodes.call(self._meta_slot_key, lambda client: client.ping(), "PING")
        if not reply:
            raise Unavailable(f"Redis at {self.config.url.split('@')[-1]} did not answer PING")

    @property
    def map_bytes(self) -> int:
        return 0

    def too_old(self) -> Unavailable:
        return Unavailable(f"a read lasted longer than store.redis_snapshot_seconds ({self.config.snapshot_seconds:g} s) "
                           "and its snapshot was trimmed; retry the request")

    def _require_open(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed (server shutting down); retry against a running server")

    def _run_script(self, client: redis.Redis, name: str, source: str, args: list, pipeline_tail: Callable | None = None):
        sha = self._scripts.get(name)
        if sha is None:
            sha = self._scripts[name] = hashlib.sha1(source.encode()).hexdigest()
        for _ in range(2):
            try:
                if pipeline_tail is None:
                    return client.evalsha(sha, len(self.meta_keys), *self.meta_keys, *args)
                pipe = client.pipeline(transaction=False)
                pipe.evalsha(sha, len(self.meta_keys), *self.meta_keys, *args)
                pipeline_tail(pipe)
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                client.script_load(source)  # a new, restarted or promoted primary: load it and run again
        raise redis.ConnectionError(f"script {name} could not be loaded")

    def meta_script(self, name: str, source: str, args: list, pipeline_tail: Callable | None = None):
        self._require_open()
        return self.nodes.call(self._meta_slot_key, lambda client: self._run_script(client, name, source, args, pipeline_tail), name)

    def _wait_replicas(self, pipe) -> None:
        if self.config.min_replicas:
            pipe.execute_command("WAIT", self.config.min_replicas, int(self.config.timeout_seconds * 1000))

    def _check_acks(self, acknowledged: int, what: str) -> None:
        if self.config.min_replicas and acknowledged < self.config.min_replicas:
            raise Unavailable(f"{what} reached the primary but only {acknowledged} of store.redis_min_replicas={self.config.min_replicas} "
                              f"replicas acknowledged it within {self.config.timeout_seconds:g} s; its outcome is unknown: retry")

    def _version(self) -> int:
        commit_key = self.meta_keys[2 * len(META_SPACES) + FIXED_KEYS.index("commit")]
        raw = self.nodes.call(self._meta_slot_key, lambda client: client.get(commit_key), "GET commit")
        return int(raw or 0)

    def block_key(self, key: bytes) -> bytes:
        return self._block_prefix + key.hex().encode()

    # ------------------------------------------------------------------ reads
    @contextlib.contextmanager
    def read(self) -> Iterator[RedisReadTxn]:
        self._require_open()
        yield RedisReadTxn(self, self._version())

    def get_block(self, key: bytes) -> bytes | None:
        self._require_open()
        name = self.block_key(key)
        return self.nodes.call(name, lambda client: client.get(name), "GET block")

    def get_blocks(self, keys: list[bytes]) -> list[bytes | None]:
        """Several blocks: one pipeline per primary, all primaries at once."""
        self._require_open()
        names = [self.block_key(key) for key in keys]

        def fetch(client: redis.Redis, indexes: list[int]) -> list:
            pipe = client.pipeline(transaction=False)
            for index in indexes:
                pipe.get(names[index])
            return pipe.execute()

        return self.nodes.per_primary(names, fetch, "GET blocks")

    def scan_blocks(self, txn: RedisReadTxn, start: bytes, prefix: bytes, values: bool):
        """Every stored block in key order (a SCAN of every primary: for scrubs and checks)."""
        keys = sorted(key for key in self._all_block_keys() if key >= max(start, prefix) and key.startswith(prefix))
        for key in keys:
            if values:
                value = self.get_block(key)
                if value is None:
                    continue
                yield key, value
            else:
                yield key, None

    def _all_block_keys(self) -> set[bytes]:
        found: set[bytes] = set()
        pattern = self._block_prefix + b"*"
        for address in self.nodes.primaries():
            client = self.nodes.client(address)
            for name in client.scan_iter(match=pattern, count=1000):
                try:
                    found.add(bytes.fromhex(name[len(self._block_prefix):].decode()))
                except ValueError:
                    log.error("unreadable block key", extra={"fields": {"key": name[:80].hex()}})
        return found

    # ------------------------------------------------------------------ writes
    def write(self, fn: Callable[[RedisWriteTxn], T], size: int = 0) -> T:
        """Run ``fn`` against the latest snapshot and commit it; on a conflict with a commit
        that landed meanwhile (another server, or a sweep) run it again from scratch."""
        self._require_open()
        deadline = time.monotonic() + self.config.failover_seconds
        delay = 0.002
        with self._write_lock:
            while True:
                txn = RedisWriteTxn(self, self._version())
                result = fn(txn)
                if self._commit(txn):
                    return result
                self.conflicts += 1
                if time.monotonic() > deadline:
                    raise Unavailable(f"a write kept conflicting with other writers for {self.config.failover_seconds:g} s; retry")
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.1)

    def _commit(self, txn: RedisWriteTxn) -> bool:
        epochs: list[tuple[bytes, str]] = []
        if txn.new_blocks:
            chunks = sorted({key[:KEY_BYTES] for key in txn.new_blocks})
            epochs = [(chunk, str(epoch)) for chunk, epoch in zip(chunks, self._idle_epochs(chunks))]
            self.confirm_replicas(self._put_block_values(list(txn.new_blocks.items()))[1])
        writes = [(space_letter(space) + key, value) for (space, key), value in txn.changes.items()]
        if not writes and not txn.doomed:
            return True
        return self._commit_script(txn.version, sorted(txn.reads), sorted(txn.scans), epochs, writes, sorted(txn.doomed))

    def _commit_script(self, version: int, reads: list[bytes], scans: list[bytes], epochs: list[tuple[bytes, str]],
                       writes: list[tuple[bytes, bytes | None]], doomed: list[bytes], wait: bool = True) -> bool:
        """One commit script on the metadata primary; ``wait``: WAIT for min_replicas after it."""
        token = os.urandom(12).hex()
        args: list = [version, int(time.time() * 1000), token, len(reads), *reads, len(scans), *scans, len(epochs)]
        for chunk, epoch in epochs:
            args += [chunk, epoch]
        args.append(len(writes))
        for field, value in writes:
            args += [field, b"d" if value is None else b"p", b"" if value is None else value]
        args += [len(doomed), *doomed]
        while True:
            replies = self.meta_script("commit", COMMIT, args, self._wait_replicas if wait else None)
            replies = replies if wait else [replies]
            reply = replies[0]
            if reply[0] == 2:  # a sweep of one of these chunks is running: wait for it
                time.sleep(0.005)
                if any(e != "even" for _, e in epochs):
                    return False
                continue
            if reply[0] == 0:
                return False
            if len(replies) > 1:
                self._check_acks(int(replies[1]), "a commit")
            self.commits += 1
            self.batched += 1
            return True

    def _idle_epochs(self, chunks: list[bytes]) -> list[int]:
        """The chunks' sweep epochs once no sweep of any of them is running (even); one HMGET."""
        sweeps = self.meta_keys[2 * len(META_SPACES) + FIXED_KEYS.index("sweeps")]
        deadline = time.monotonic() + self.config.failover_seconds
        while True:
            raw = self.nodes.call(self._meta_slot_key, lambda client: client.hmget(sweeps, chunks), "HMGET sweep epochs")
            epochs = [int(value or 0) for value in raw]
            if all(epoch % 2 == 0 for epoch in epochs):
                return epochs
            if time.monotonic() > deadline:
                raise Unavailable("a block sweep did not finish in time; retry")
            time.sleep(0.005)

    def _put_block_values(self, blocks: list[tuple[bytes, bytes]]) -> tuple[int, Receipts]:
        """SET NX every block on its primary (one pipeline per primary, all primaries at once):
        how many were new, and the receipts (which process took them). Redis out of memory is
        CapacityExceeded. No WAIT here: the write that will reference these blocks confirms
        their replicas once, from the receipts (``confirm_replicas``), not once per batch."""
        names = [self.block_key(key) for key, _ in blocks]
        receipts: Receipts = {}
        lock = threading.Lock()

        def put(client: redis.Redis, indexes: list[int]) -> list:
            pipe = client.pipeline(transaction=False)
            for index in indexes:
                pipe.set(names[index], blocks[index][1], nx=True)
            if self.config.min_replicas:
                pipe.info("server")
            replies = pipe.execute()
            if self.config.min_replicas:
                with lock:
                    merge_receipts(receipts, {_address_of(client): replies.pop()["run_id"]})
            return replies

        new = sum(1 for reply in self.nodes.per_primary(names, put, "SET blocks") if reply)
        return new, receipts

    def confirm_replicas(self, receipts: Receipts) -> None:
        """Return once the blocks behind ``receipts`` are on min_replicas replicas: on each primary
        that took some, a marker write (so this connection's replication offset covers every
        earlier write on that primary, whichever connection made it) then WAIT. A primary that is
        another process now than the one that took the blocks (failover, restart) may have lost
        them: UNAVAILABLE, the outcome unknown; the save is retried (its blocks written again)."""
        if not self.config.min_replicas or not receipts:
            return
        marker = f"{self.config.namespace}:barrier:".encode()

        def changed(address: tuple[str, int], how: str) -> Unavailable:
            return Unavailable(f"Redis node {address[0]}:{address[1]} {how} after it took blocks that may not have reached a replica; "
                               "the save's outcome is unknown: retry it")

        def confirm(address: tuple[str, int], run_id: str) -> None:
            if run_id == "changed":
                raise changed(address, "restarted or failed over")
            if address not in self.nodes.primaries():
                raise changed(address, "is no longer a primary (failover)")
            tag = self._barrier_tags.get(address)
            if tag is None or self.nodes.primary(tag) != address:
                tag = self._barrier_tags[address] = slot_tag_for(self.nodes, address)
            pipe = self.nodes.client(address).pipeline(transaction=False)
            pipe.set(marker + tag, b"1", px=60_000)
            pipe.info("server")
            pipe.execute_command("WAIT", self.config.min_replicas, int(self.config.timeout_seconds * 1000))
            try:
                _, info, acknowledged = pipe.execute()
            except redis.RedisError as exc:
                raise changed(address, f"did not answer ({exc})") from exc
            if info["run_id"] != run_id:
                raise changed(address, "restarted or failed over")
            self._check_acks(int(acknowledged), "a block write")

        self.nodes.on_each(list(receipts.items()), confirm)

    def put_blocks(self, blocks: Iterable[tuple[bytes, bytes]], staged: Iterable[tuple[bytes, bytes]] = ()) -> _Pending:
        """Staging marks first (one commit), then the blocks (``SET NX``), in a worker thread;
        the records go to the sockets as they are (no copy: the caller keeps them unchanged)."""
        self._require_open()
        blocks = list(blocks)
        staged = [(key, bytes(value)) for key, value in staged]

        def run() -> int:
            if staged:
                chunks = sorted({key[:KEY_BYTES] for key, _ in staged} | {key[:KEY_BYTES] for key, _ in blocks})
                writes = [(space_letter("staged") + key, value) for key, value in staged]
                # no WAIT: replication keeps order, so the WAIT after the session's own commit covers
                # these marks too, and a save whose primary fails before that is not acknowledged
                if not self._commit_script(_ANY_VERSION, [], [], [(chunk, "even") for chunk in chunks], writes, [], wait=False):
                    raise Unavailable("staging a write conflicted; retry")  # cannot happen: no reads
            return self._put_block_values(blocks)

        return _Pending(self._pool.submit(run))

    # ------------------------------------------------------------------ maintenance
    def trim(self, older_than_s: float | None = None) -> int:
        """Drop undo entries of commits older than the snapshot retention; commits trimmed."""
        cutoff = int((time.time() - (self.config.snapshot_seconds if older_than_s is None else older_than_s)) * 1000)
        total = 0
        while True:
            trimmed = int(self.meta_script("trim", TRIM, [cutoff, 500]))
            total += trimmed
            if trimmed < 500:
                return total

    def sweep_blocks(self, grace_s: float | None = None) -> int:
        """Delete doomed blocks older than the grace period that nothing references; deleted."""
        grace = self.config.block_grace_seconds if grace_s is None else grace_s
        deleted = 0
        while True:
            now = int(time.time() * 1000)
            claimed = [bytes(key) for key in self.meta_script("claim", CLAIM_SWEEP, [int(now - grace * 1000), now, now - 60_000, 500, KEY_BYTES])]
            if not claimed:
                return deleted
            for key in claimed:
                name = self.block_key(key)

                def drop(client: redis.Redis, name=name) -> list:
                    pipe = client.pipeline(transaction=False)
                    pipe.delete(name)
                    self._wait_replicas(pipe)
                    return pipe.execute()

                deleted += int(self.nodes.call(name, drop, "DEL block")[0])
            self.meta_script("finish", FINISH_SWEEP, [KEY_BYTES, *claimed])

    def mark_orphans(self) -> int:
        """Doom every stored block whose chunk no record references and no stream stages (the
        mark of mark-and-sweep; the sweep deletes them after the grace period)."""
        keys = sorted(self._all_block_keys())
        marked = 0
        for at in range(0, len(keys), 500):
            marked += int(self.meta_script("mark", MARK_ORPHANS, [int(time.time() * 1000), KEY_BYTES, *keys[at : at + 500]]))
        return marked

    def _maintain(self) -> None:
        while not self._stop.wait(self.config.maintenance_seconds):
            try:
                self.trim()
                self.sweep_blocks()
                if self.config.orphan_scan_seconds and time.monotonic() - self._last_orphan_scan > self.config.orphan_scan_seconds:
                    self._last_orphan_scan = time.monotonic()
                    self.mark_orphans()
            except Unavailable as exc:
                log.warning("redis maintenance skipped", extra={"fields": {"error": str(exc)[:200]}})
            except Exception:  # noqa: BLE001 - keep the thread alive, but say what happened
                log.exception("redis maintenance failed")

    # ------------------------------------------------------------------ the rest of the contract
    def used_bytes(self) -> int:
        total = 0
        for address in self.nodes.primaries():
            try:
                total += int(self.nodes.client(address).info("memory").get("used_memory", 0))
            except redis.RedisError:
                pass
        return total

    def capacity_bytes(self) -> int:
        """The primaries' maxmemory together; 0 when any of them has none (then Redis is bounded
        only by the hosts' memory)."""
        total = 0
        for address in self.nodes.primaries():
            try:
                limit = int(self.nodes.client(address).config_get("maxmemory").get("maxmemory", 0))
            except redis.RedisError:
                return 0  # CONFIG may be disabled (managed Redis): unknown
            if not limit:
                return 0
            total += limit
        return total

    def snapshot(self, destination) -> None:
        """An LMDB copy of the committed state (one snapshot; writes go on meanwhile): every
        metadata space at the snapshot and the blocks of every referenced chunk."""
        from kvstore.lmdb_backend import LmdbBackend, LmdbConfig

        destination = Path(destination)
        if destination.exists() and any(destination.iterdir()):
            raise FileExistsError(f"{destination} exists and is not empty; choose a new directory")
        copy = LmdbBackend(LmdbConfig(destination))
        try:
            with self.read() as txn:
                for space in META_SPACES:
                    rows = [(key, value) for key, value in txn.scan(space)]
                    for at in range(0, len(rows), 1000):
                        copy.write(lambda tx, part=rows[at : at + 1000], space=space: [tx.put(space, k, v) for k, v in part])
                from kvstore.chunking import block_storage_key
                from kvstore.txn import REF

                for chunk, raw in txn.scan("refs"):
                    layers = REF.unpack(raw)[1]
                    pairs = [(block_storage_key(chunk, layer), self.get_block(block_storage_key(chunk, layer))) for layer in range(layers)]
                    copy.write(lambda tx, pairs=pairs: [tx.put("blocks", k, v) for k, v in pairs if v is not None])
        finally:
            copy.close()

    def sync(self) -> None:
        """Nothing to do: every commit is on the primary (and WAITed for) when write returns."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._maintainer is not None:
            self._maintainer.join(timeout=10)
        self._pool.shutdown(wait=True)
        self.nodes.close()


def _address_of(client: redis.Redis) -> tuple[str, int]:
    options = client.connection_pool.connection_kwargs
    return options["host"], int(options["port"])


def slot_tag_for(nodes: Nodes, address: tuple[str, int]) -> bytes:
    """A key suffix ``{tag}`` whose slot that primary serves (the first such tag of a fixed list)."""
    for number in range(1 << 16):
        tag = b"{" + str(number).encode() + b"}"
        if nodes.primary(tag) == address:
            return tag
    raise Unavailable(f"no hash slot is served by {address[0]}:{address[1]}; the cluster map changed: retry")

