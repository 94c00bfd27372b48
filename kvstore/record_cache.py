"""Session records decoded once per stored version.

A session record carries its token ids and chunk references: about 1 MB for a 256k-token session,
and decoding it (copy, checksum, parse) took ~4 ms of every request on it. The cache keeps the
decoded record beside the exact bytes it came from; a later read that finds the same bytes in
the store gets the same record, and any other bytes (an append, an overwrite, damage on disk) are
decoded and checked again. So the cache can never serve what the store no longer holds, and
corruption is still detected on the first read that sees it.

Records handed out are shared between callers: their arrays are made read-only.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from kvstore.codec import decode_session
from kvstore.records import SessionRecord


class DecodedRecords:
    """Thread-safe LRU of decoded session records keyed by session key, bounded by the bytes of
    the raw records it holds (each also holds a decoded copy of about the same size)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"record cache bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, tuple[bytes, SessionRecord]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def decode(self, key: bytes, raw: bytes | memoryview) -> SessionRecord:
        """``decode_session(key, raw)``, or the record decoded earlier from these same bytes."""
        data = bytes(raw)
        with self._lock:
            held = self._entries.get(key)
            if held is not None and held[0] == data:
                self._entries.move_to_end(key)
                self.hits += 1
                return held[1]
        record = decode_session(key, data)  # raises CorruptData: nothing is cached then
        for array in (record.token_ids, record.positions):
            if array is not None:
                array.flags.writeable = False
        if 2 * len(data) > self.max_bytes:
            return record
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= 2 * len(old[0])
            self._entries[key] = (data, record)
            self._bytes += 2 * len(data)
            while self._bytes > self.max_bytes:
                _, (evicted, _) = self._entries.popitem(last=False)
                self._bytes -= 2 * len(evicted)
        return record

    def forget(self, key: bytes) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= 2 * len(old[0])
