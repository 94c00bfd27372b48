"""Streaming writes: the blocks of one save or append, checked, checksummed and written as their
chunks arrive, invisible until the session record that names them is committed.

A ``StagedWrite`` fills one encoded block record per (chunk, layer) in place as pieces arrive;
a full record is sealed (checksummed) and queued, and queued records are written
(put-if-absent) once they reach ``flush_bytes``, together with a ``staged`` entry
``chunk key + owner (16 bytes) -> staged at (ms), layers`` per chunk. One batch is written while
the next fills, so the server holds at most two batches plus the blocks being filled per open
stream, whatever the size of the session; a global ``InflightBudget`` bounds the sum over all
streams (RESOURCE_EXHAUSTED instead of growing). The last batch is written by the commit itself.

Staged blocks are invisible: only a committed session record refers to chunks, and only the
commit (``SessionStore``) gives a chunk its first reference and removes the staged entries.
A cancelled stream removes what it staged (``abort``); a crash leaves staged entries, which
``sweep`` removes at start and periodically. A chunk's blocks are deleted only when it has no
reference and no other stream has it staged, so two streams writing the same prefix never
delete each other's blocks.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kvstore.backend import Backend, Receipts, WriteTxn, merge_receipts
from kvstore.chunking import block_storage_key
from kvstore.codec import block_record_bytes, new_block_record, record_payload, reset_block_record, seal_block_record
from kvstore.errors import CapacityExceeded, InvalidRequest
from kvstore.keys import OWNER_BYTES, staged_key
from kvstore.pieces import check_piece
from kvstore.spec import DTYPE_CODES, ModelSpec

_STAGED_AT = struct.Struct(">QH")  # staged entry: when (ms) and how many layers the chunk has
FLUSH_BYTES = 4 << 20  # sealed blocks per write; one more batch may be in flight


class InflightBudget:
    """Bytes of unfinished writes held in memory by all open streams, bounded."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def take(self, nbytes: int) -> None:
        with self._lock:
            if self._used + nbytes > self.max_bytes:
                raise CapacityExceeded(
                    f"the server holds {self._used} bytes of unfinished writes (limit store.inflight_bytes={self.max_bytes}); "
                    "retry in a moment, or send chunks aligned to the store's chunk size so they are written as they arrive"
                )
            self._used += nbytes

    def give(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of the write: its key, token range and whether its blocks must be written."""

    key: bytes
    start: int
    count: int
    write: bool  # False: stored already (dedup) or outside the sent range; only coverage is checked

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass
class _Assembly:
    """One (chunk, layer) block being filled: its record (None when not written) and coverage."""

    record: bytearray | None
    covered: np.ndarray  # bool [count]
    filled: int = 0
    views: tuple | None = field(default=None, repr=False)


class LiveOwners:
    """Owner ids of the write streams open in this process (the periodic sweep spares them)."""

    def __init__(self) -> None:
        self._owners: set[bytes] = set()
        self._lock = threading.Lock()

    def new(self) -> bytes:
        owner = os.urandom(OWNER_BYTES)
        with self._lock:
            self._owners.add(owner)
        return owner

    def done(self, owner: bytes) -> None:
        with self._lock:
            self._owners.discard(owner)

    def __contains__(self, owner: bytes) -> bool:
        with self._lock:
            return owner in self._owners


class StagedWrite:
    """KV of tokens [start, end) of every layer, written block by block as it arrives.

    ``chunks`` cover [chunks[0].start, end) contiguously and are aligned to ``chunk_tokens``;
    ``prefill`` (layer -> (keys, values, bias) raw arrays of tokens [chunks[0].start, start))
    is KV already stored that the first chunk must hold (an append completing a partial tail).
    """

    def __init__(self, backend: Backend, budget: InflightBudget, owners: LiveOwners, spec: ModelSpec, start: int, end: int,
                 has_bias: bool, chunks: list[ChunkPlan], chunk_tokens: int, *, prefill: dict | None = None, flush_bytes: int = FLUSH_BYTES):
        self.backend, self.budget, self.owners = backend, budget, owners
        self.spec, self.start, self.end, self.has_bias = spec, start, end, has_bias
        self.chunks, self.chunk_tokens, self.flush_bytes = chunks, chunk_tokens, flush_bytes
        self.dtype_code = DTYPE_CODES[spec.torch_dtype]
        self.owner = owners.new()
        self._origin = chunks[0].start if chunks else start
        self._open: dict[tuple[int, int], _Assembly] = {}  # (chunk index, layer) -> block being filled
        self._done: set[tuple[int, int]] = set()
        self._queue: list[tuple[bytes, bytearray]] = []
        self._queued_bytes = 0
        self._held = 0  # bytes taken from the budget
        self._staged_chunks: set[int] = set()  # chunk indexes with a staged entry written
        self._unflushed_chunks: set[int] = set()
        self._in_flight = None  # (pending write, its records, their bytes, their chunk indexes)
        self._full_record_bytes = block_record_bytes((spec.num_kv_heads, chunk_tokens, spec.head_dim), self.dtype_code, has_bias)
        self._max_spare = max(1, flush_bytes // self._full_record_bytes + 1)
        self._spare: list[bytearray] = []  # written records of full chunks, refilled instead of allocated
        self._finished = self._closed = False
        self.bytes_received = 0
        self.receipts: Receipts = {}  # where the flushed blocks landed (backends whose writes need confirming)
        if prefill:
            for layer, arrays in prefill.items():
                self._fill(layer, self._origin, start - self._origin, *arrays)

    def record_bytes(self, chunk: ChunkPlan) -> int:
        """Bytes of all layers' records of one chunk."""
        shape = (self.spec.num_kv_heads, chunk.count, self.spec.head_dim)
        return self.spec.num_layers * block_record_bytes(shape, self.dtype_code, self.has_bias)

    # ------------------------------------------------------------------ pieces in
    def add(self, layer: int, token_start: int, count: int, dtype_code: int, keys, values, bias=None) -> None:
        """One piece: keys/values bytes-like [H, n, D] raw little-endian, bias float32 [H, n]."""
        self._require_open()
        k, v, b = check_piece(self.spec, self.dtype_code, self.has_bias, self.start, self.end, layer, token_start, count, dtype_code, keys, values, bias)
        self._accept(layer, token_start, count, k, v, b)

    def add_arrays(self, layer: int, token_start: int, keys: np.ndarray, values: np.ndarray, bias: np.ndarray | None) -> None:
        """Raw-bit arrays [H, n, D] (bias [H, n]) from process memory."""
        self.add(layer, token_start, keys.shape[1], self.dtype_code, memoryview(np.ascontiguousarray(keys)).cast("B"),
                 memoryview(np.ascontiguousarray(values)).cast("B"), None if bias is None else memoryview(np.ascontiguousarray(bias)).cast("B"))

    def add_views(self, layer: int, token_start: int, keys: np.ndarray, values: np.ndarray, bias: np.ndarray | None) -> None:
        """Raw-bit arrays [H, n, D] (bias float32 [H, n]) from a checked ``KVPieces``, possibly
        strided: copied once, straight into the block records."""
        self._require_open()
        count = keys.shape[1]
        shape = (self.spec.num_kv_heads, count, self.spec.head_dim)
        if keys.shape != shape or values.shape != shape or keys.dtype.itemsize != values.dtype.itemsize or (bias is None) == self.has_bias:
            raise InvalidRequest(f"layer {layer}: pieces of shape {keys.shape}/{values.shape} (bias {bias is not None}) do not match {shape} (bias {self.has_bias})")
        if token_start < self.start or token_start + count > self.end:
            raise InvalidRequest(f"layer {layer}: tokens [{token_start}, {token_start + count}) lie outside [{self.start}, {self.end})")
        self._accept(layer, token_start, count, keys, values, bias)

    def _require_open(self) -> None:
        if self._finished or self._closed:
            raise InvalidRequest("this write is already finished")

    def _accept(self, layer: int, token_start: int, count: int, keys: np.ndarray, values: np.ndarray, bias: np.ndarray | None) -> None:
        """A checked piece: into its block records, and a flush once enough is sealed."""
        self.bytes_received += 2 * keys.nbytes
        self._fill(layer, token_start, count, keys, values, bias)
        if self._queued_bytes >= self.flush_bytes:
            self.flush()

    def _fill(self, layer: int, token_start: int, count: int, keys: np.ndarray, values: np.ndarray, bias: np.ndarray | None) -> None:
        position = token_start
        end = token_start + count
        while position < end:
            index = (position - self._origin) // self.chunk_tokens
            chunk = self.chunks[index]
            hi = min(end, chunk.end)
            self._put(index, chunk, layer, position - chunk.start, hi - chunk.start, keys, values, bias, position - token_start)
            position = hi

    def _put(self, index: int, chunk: ChunkPlan, layer: int, lo: int, hi: int, keys, values, bias, offset: int) -> None:
        slot = (index, layer)
        if slot in self._done:
            raise InvalidRequest(f"layer {layer}: chunks have an overlap at token {chunk.start + lo}; each token must be sent exactly once")
        assembly = self._open.get(slot)
        if assembly is None:
            assembly = self._open[slot] = self._new_assembly(chunk, layer)
        if assembly.covered[lo:hi].any():
            first = lo + int(np.argmax(assembly.covered[lo:hi]))
            raise InvalidRequest(f"layer {layer}: chunks have an overlap at token {chunk.start + first}; each token must be sent exactly once")
        assembly.covered[lo:hi] = True
        assembly.filled += hi - lo
        n = hi - lo
        if assembly.views is not None:
            k, v, b = assembly.views
            k[:, lo:hi] = keys[:, offset : offset + n]
            v[:, lo:hi] = values[:, offset : offset + n]
            if b is not None:
                b[:, lo:hi] = bias[:, offset : offset + n]
        if assembly.filled == chunk.count:
            del self._open[slot]
            self._done.add(slot)
            if assembly.record is not None:
                storage_key = block_storage_key(chunk.key, layer)
                self._queue.append((storage_key, seal_block_record(storage_key, assembly.record)))
                self._queued_bytes += len(assembly.record)
                self._unflushed_chunks.add(index)

    def _new_assembly(self, chunk: ChunkPlan, layer: int) -> _Assembly:
        covered = np.zeros(chunk.count, dtype=bool)
        if not chunk.write:
            return _Assembly(None, covered)
        shape = (self.spec.num_kv_heads, chunk.count, self.spec.head_dim)
        size = block_record_bytes(shape, self.dtype_code, self.has_bias)
        self.budget.take(size)
        self._held += size
        if size == self._full_record_bytes and self._spare:  # every byte of it is written again before it is sealed
            record = reset_block_record(self._spare.pop(), layer, shape, self.dtype_code, self.has_bias)
        else:
            record = new_block_record(layer, shape, self.dtype_code, self.has_bias)
        return _Assembly(record, covered, views=record_payload(record, shape, self.dtype_code))

    # ------------------------------------------------------------------ out
    def flush(self) -> None:
        """Queue the sealed blocks so far for writing (staged: invisible until the commit) and
        go on filling: at most one flush per stream is in flight, so filling the next batch
        overlaps writing this one."""
        self._wait_flushed()
        if not self._queue:
            return
        # the first flush stages every chunk this write will fill, so later flushes carry blocks
        # only (on Redis each staging is a commit on the metadata primary: one per write, not per batch)
        staging = set() if self._staged_chunks else {index for index, chunk in enumerate(self.chunks) if chunk.write} | self._unflushed_chunks
        now = _STAGED_AT.pack(int(time.time() * 1000), self.spec.num_layers)
        staged = [(staged_key(self.chunks[i].key, self.owner), now) for i in sorted(staging)]
        self._in_flight = (self.backend.put_blocks(self._queue, staged), self._queue, self._queued_bytes, self._unflushed_chunks | staging)
        self._unflushed_chunks = set()
        self._queue, self._queued_bytes = [], 0

    def _wait_flushed(self) -> None:
        """Wait for the flush in flight (its errors surface here); its buffers are reused."""
        if self._in_flight is None:
            return
        pending, records, nbytes, chunks = self._in_flight
        self._in_flight = None
        try:
            pending.wait()
            merge_receipts(self.receipts, getattr(pending, "receipts", {}))
        finally:
            self.budget.give(nbytes)
            self._held -= nbytes
        self._staged_chunks |= chunks
        self._spare = [record for _, record in records if len(record) == self._full_record_bytes][: self._max_spare]

    def finish(self) -> None:
        """Every layer must cover [start, end) exactly once (then the commit writes the rest)."""
        if self._finished:
            return
        self._wait_flushed()
        for layer in range(self.spec.num_layers):
            for index, chunk in enumerate(self.chunks):
                if chunk.end <= self.start or (index, layer) in self._done:
                    continue
                assembly = self._open.get((index, layer))
                covered = 0 if assembly is None else int(np.argmin(assembly.covered)) if not assembly.covered.all() else chunk.count
                got = max(self.start, chunk.start + covered)
                raise InvalidRequest(
                    f"layer {layer}: chunks cover tokens [{self.start}, {got}) of [{self.start}, {self.end}); "
                    "the stream ended early or chunks are missing, nothing was stored"
                )
        self._finished = True

    def confirm_durable(self) -> None:
        """Before the commit: the flushed blocks are as durable as the backend promises (on Redis,
        on min_replicas replicas; a primary that changed since is UNAVAILABLE)."""
        confirm = getattr(self.backend, "confirm_replicas", None)
        if confirm is not None:
            confirm(self.receipts)

    def pending_blocks(self) -> list[tuple[bytes, bytearray]]:
        """Sealed blocks not flushed yet: the commit writes them in its own transaction (one
        fsync for a small write, instead of a flush and then a commit)."""
        return self._queue

    def staged_keys(self) -> list[bytes]:
        """``staged`` entries this write made (the commit deletes them)."""
        return [staged_key(self.chunks[i].key, self.owner) for i in sorted(self._staged_chunks)]

    def written_chunks(self) -> set[bytes]:
        """Keys of the chunks whose blocks this write staged or holds pending (all layers, after
        ``finish``)."""
        return {self.chunks[i].key for i in self._staged_chunks | self._unflushed_chunks}

    def committed(self) -> None:
        """The commit linked the staged chunks and removed the staged entries."""
        self._release()
        self._staged_chunks = set()

    def abort(self) -> None:
        """Drop everything: the blocks held in memory and the staged blocks no one else uses."""
        if self._closed:
            return
        try:
            self._wait_flushed()  # its staged entries must be known to be removed
        except Exception:  # noqa: BLE001 - a failed flush stored nothing
            pass
        self._release()
        if self._staged_chunks:
            chunks = [(self.chunks[i].key, self.spec.num_layers) for i in sorted(self._staged_chunks)]
            per_group = max(1, self.flush_bytes // max(1, self.record_bytes(self.chunks[0])))
            unstage_all(self.backend, {self.owner: chunks}, per_group)
            self._staged_chunks = set()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.budget.give(self._held)
        self._held = 0
        self._open.clear()
        self._queue = []
        self._spare = []
        self.owners.done(self.owner)


def unstage(txn: WriteTxn, chunks: list[tuple[bytes, int]], owner: bytes) -> int:
    """Remove ``owner``'s staged entries of ``chunks`` (chunk key, layers); delete the blocks of
    each chunk that no committed session references and no other stream has staged (by their
    keys: nothing is read). Returns blocks deleted."""
    deleted = 0
    for chunk_key, layers in chunks:
        txn.delete("staged", staged_key(chunk_key, owner))
        if txn.get("refs", chunk_key) is not None or next(txn.scan("staged", prefix=chunk_key, values=False), None) is not None:
            continue
        deleted += sum(txn.delete("blocks", block_storage_key(chunk_key, layer)) for layer in range(layers))
    return deleted


def sweep(backend: Backend, live: LiveOwners | None = None, older_than_s: float = 0.0) -> tuple[int, int]:
    """Remove staged entries of streams that are gone (all of them at start, when ``live`` is
    None) and older than ``older_than_s``, with their unreferenced blocks.
    Returns (entries removed, blocks deleted)."""
    cutoff = int((time.time() - older_than_s) * 1000)
    doomed: dict[bytes, list[tuple[bytes, int]]] = {}
    with backend.read() as txn:
        for key, raw in txn.scan("staged"):
            chunk_key, owner = key[:-OWNER_BYTES], key[-OWNER_BYTES:]
            if (live is not None and owner in live) or len(raw) != _STAGED_AT.size:
                continue
            staged_at, layers = _STAGED_AT.unpack(raw)
            if staged_at <= cutoff:
                doomed.setdefault(owner, []).append((chunk_key, layers))
    if not doomed:
        return 0, 0

    blocks = unstage_all(backend, doomed, 64)
    return sum(len(chunks) for chunks in doomed.values()), blocks


def unstage_all(backend: Backend, chunks_by_owner: dict[bytes, list[tuple[bytes, int]]], per_group: int) -> int:
    """``unstage`` in transactions of ``per_group`` chunks, unmapping the file's pages after each
    (deleting a block maps all of its pages): memory stays bounded however much was staged."""
    deleted = 0
    drop = getattr(backend, "drop_mapped_pages", None)
    for owner, chunks in chunks_by_owner.items():
        for at in range(0, len(chunks), per_group):
            group = chunks[at : at + per_group]
            deleted += backend.write(lambda txn, group=group, owner=owner: unstage(txn, group, owner))
            if drop is not None:
                drop()
    return deleted
