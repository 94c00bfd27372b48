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

from kvstore.codec import decode_session
from kvstore.lru import ByteLRU
from kvstore.records import SessionRecord


class DecodedRecords(ByteLRU):
    """Decoded session records keyed by session key, each kept with the raw bytes it came from;
    the bound counts twice the raw bytes (the decoded copy is about as large)."""

    what = "record cache"

    def decode(self, key: bytes, raw: bytes | memoryview) -> SessionRecord:
        """``decode_session(key, raw)``, or the record decoded earlier from these same bytes."""
        data = bytes(raw)
        held = self.get(key)
        if held is not None and held[0] == data:
            return held[1]
        record = decode_session(key, data)  # raises CorruptData: nothing is cached then
        for array in (record.token_ids, record.positions):
            if array is not None:
                array.flags.writeable = False
        self.put(key, (data, record), 2 * len(data))
        return record
