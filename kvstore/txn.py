"""One write transaction of the store: refcounts, counters, per-tenant usage and catalogue,
session and aux records, all changed together (``CatalogTxn``).

Each tenant's row in the ``usage`` space holds its usage (sessions, stored bytes after dedup,
logical bytes) and its *catalogue digest*: the XOR of ``keys.catalog_digest`` over its session
keys. Count and digest change in the same transaction as the sessions, so a scan of the tenant's
keys that disagrees with them shows damage (``kvstore.catalog``), never a silently short list.
"""
from __future__ import annotations

import json
import logging
import struct
from typing import Callable

from kvstore.backend import ReadTxn, WriteTxn
from kvstore.chunking import block_storage_key
from kvstore.codec import AuxRecord, Block, decode_aux, decode_session, encode_aux, encode_session
from kvstore.errors import CorruptData
from kvstore.keys import aux_key, catalog_digest, split_session_key, ttl_key
from kvstore.quota import Quota, TenantUsage, check_quota
from kvstore.records import SessionRecord

log = logging.getLogger("kvmem.store")
REF = struct.Struct("<IIQ")  # refcount, layers, record bytes of all layers
COUNTER_KEYS = ("sessions", "chunks", "stored_bytes", "logical_bytes")
USAGE_KEYS = ("sessions", "stored_bytes", "logical_bytes")  # per tenant, in the "usage" space
DIGEST_FIELD = "catalog"  # hex of the tenant's catalogue digest, in its usage row
USAGE_MARKER = b"tenant_usage"  # meta key: {"version": n} once per-tenant usage is complete
USAGE_VERSION = 2  # 2: rows carry the catalogue digest


def parse_usage_row(tenant: str, raw) -> tuple[TenantUsage, int]:
    """(usage, catalogue digest) from a tenant's row (None: nothing stored); CorruptData if the
    row is not what this store writes."""
    try:
        fields = json.loads(bytes(raw)) if raw is not None else {}
        usage = TenantUsage(tenant, **{key: int(fields.get(key, 0)) for key in USAGE_KEYS})
        return usage, int(fields.get(DIGEST_FIELD, "0"), 16)
    except (ValueError, TypeError, AttributeError) as exc:
        raise CorruptData(f"the usage row of tenant {tenant!r} is damaged ({exc}); run `kvmem verify`") from None


def read_usage(txn: ReadTxn, tenant: str) -> tuple[TenantUsage, int]:
    return parse_usage_row(tenant, txn.get("usage", tenant.encode()))


def read_counters(txn: ReadTxn) -> dict[str, int]:
    """The store's totals. They are derived data: a damaged record is recomputed from the
    tenants' usage rows and the chunk references (and rewritten by the next write)."""
    raw = txn.get("meta", b"counters")
    try:
        if raw is None:
            return dict.fromkeys(COUNTER_KEYS, 0)
        stored = json.loads(bytes(raw))
        return {key: int(stored[key]) for key in COUNTER_KEYS}  # every write stores all four
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        log.error("counters record damaged; recomputed from usage rows", extra={"fields": {"error": str(exc)}})
        return recompute_counters(txn)


def recompute_counters(txn: ReadTxn) -> dict[str, int]:
    counters = dict.fromkeys(COUNTER_KEYS, 0)
    for key, raw in txn.scan("usage"):
        usage = parse_usage_row(key.decode("utf-8", "replace"), raw)[0]
        for name in USAGE_KEYS:
            counters[name] += getattr(usage, name)
    counters["chunks"] = txn.count("refs")
    return counters


def usage_row_bytes(usage: dict[str, int], digest: int) -> bytes:
    return json.dumps({**{key: usage[key] for key in USAGE_KEYS}, DIGEST_FIELD: f"{digest:016x}"}).encode()


class CatalogTxn:
    """Helpers bound to one write transaction.

    Whatever changes what a tenant stores takes the tenant explicitly (one transaction may
    touch several, e.g. expiry), so its usage row changes with the global counters.
    """

    def __init__(self, txn: WriteTxn):
        self.txn = txn
        self.counters = read_counters(txn)
        self.freed: list[bytes] = []  # storage keys of blocks deleted in this transaction
        self._usage_before: dict[str, TenantUsage] = {}  # tenant -> usage when first touched
        self._usage: dict[str, dict[str, int]] = {}  # tenant -> usage now (in this transaction)
        self._digest: dict[str, int] = {}

    def _row(self, tenant: str) -> dict[str, int]:
        row = self._usage.get(tenant)
        if row is None:
            before, digest = read_usage(self.txn, tenant)
            self._usage_before[tenant] = before
            self._digest[tenant] = digest
            row = self._usage[tenant] = {name: getattr(before, name) for name in USAGE_KEYS}
        return row

    def _count(self, tenant: str, key: str, delta: int) -> None:
        """Add ``delta`` to a global counter and, when it is per tenant, to the tenant's."""
        self.counters[key] += delta
        if key in USAGE_KEYS:
            self._row(tenant)[key] += delta

    def _catalog(self, tenant: str, skey: bytes, delta: int) -> None:
        self._count(tenant, "sessions", delta)
        self._digest[tenant] ^= catalog_digest(skey)

    def usage(self, tenant: str) -> TenantUsage:
        row = self._usage.get(tenant)
        return read_usage(self.txn, tenant)[0] if row is None else TenantUsage(tenant, **row)

    def check_quotas(self, quota_for: Callable[[str], Quota] | None) -> None:
        """CapacityExceeded if this transaction grows some tenant's usage past its quota."""
        if quota_for is None:
            return
        for tenant, before in self._usage_before.items():
            after = self.usage(tenant)
            if after.stored_bytes > before.stored_bytes or after.sessions > before.sessions:
                check_quota(before, after, quota_for(tenant))

    # ------------------------------------------------------------------ chunks
    def incref(self, key: bytes) -> bool:
        """Add a reference to a stored chunk; False if it is not stored."""
        raw = self.txn.get("refs", key)
        if raw is None:
            return False
        count, layers, nbytes = REF.unpack(raw)
        self.txn.put("refs", key, REF.pack(count + 1, layers, nbytes))
        return True

    def put_chunk(self, tenant: str, key: bytes, blocks: list[Block]) -> int:
        """Store a new chunk (all layers) of ``tenant`` with one reference; returns bytes written."""
        for block in blocks:
            self.txn.put_if_absent("blocks", block.key, block.data)
        return self.link_chunk(tenant, key, len(blocks), sum(block.nbytes for block in blocks))

    def link_chunk(self, tenant: str, key: bytes, layers: int, nbytes: int) -> int:
        """First reference to a chunk whose blocks are already written (staged)."""
        self.txn.put("refs", key, REF.pack(1, layers, nbytes))
        self._count(tenant, "chunks", 1)
        self._count(tenant, "stored_bytes", nbytes)
        return nbytes

    def decref(self, tenant: str, key: bytes) -> int:
        """Drop a reference; frees the chunk when it was the last. Returns bytes freed."""
        raw = self.txn.get("refs", key)
        if raw is None:
            return 0
        count, layers, nbytes = REF.unpack(raw)
        if count > 1:
            self.txn.put("refs", key, REF.pack(count - 1, layers, nbytes))
            return 0
        self.txn.delete("refs", key)
        if next(self.txn.scan("staged", prefix=key, values=False), None) is None:  # a stream may be rewriting it
            for layer in range(layers):
                storage_key = block_storage_key(key, layer)
                self.txn.delete("blocks", storage_key)
                self.freed.append(storage_key)
        self._count(tenant, "chunks", -1)
        self._count(tenant, "stored_bytes", -nbytes)
        return nbytes

    # ------------------------------------------------------------------ sessions
    def get_session(self, skey: bytes) -> SessionRecord | None:
        raw = self.txn.get("sessions", skey)
        return None if raw is None else decode_session(skey, raw)

    def put_session(self, tenant: str, skey: bytes, record: SessionRecord, previous: SessionRecord | None, *, replaces: bool | None = None) -> None:
        """Write ``record``; ``previous`` is the record it replaces (None: a new key).

        ``replaces=True`` with ``previous=None`` replaces a damaged record under the same key."""
        if previous is not None:
            self._unindex(tenant, skey, previous)
        elif not replaces:
            self._catalog(tenant, skey, 1)
        self.txn.put("sessions", skey, encode_session(skey, record))
        self._count(tenant, "logical_bytes", record.kv_bytes)
        if record.expires_at_ms:
            self.txn.put("ttl", ttl_key(record.expires_at_ms, skey), b"")

    def delete_session(self, tenant: str, skey: bytes, record: SessionRecord | None) -> int:
        """Delete a session (``record`` None: a damaged record, whose blocks cannot be known)."""
        freed = sum(self.decref(tenant, ref.key) for ref in record.blocks) if record is not None else 0
        self.delete_aux(skey)
        if record is not None:
            self._unindex(tenant, skey, record)
        self.txn.delete("sessions", skey)
        self._catalog(tenant, skey, -1)
        return freed

    def _unindex(self, tenant: str, skey: bytes, record: SessionRecord) -> None:
        self._count(tenant, "logical_bytes", -record.kv_bytes)
        if record.expires_at_ms:
            self.txn.delete("ttl", ttl_key(record.expires_at_ms, skey))

    # ------------------------------------------------------------------ aux
    def put_aux(self, skey: bytes, name: str, record: SessionRecord, payload: bytes) -> None:
        key = aux_key(skey, name)
        self.txn.put("aux", key, encode_aux(key, record.created_at_ms, record.version, payload))

    def get_aux(self, skey: bytes, name: str) -> AuxRecord | None:
        key = aux_key(skey, name)
        raw = self.txn.get("aux", key)
        return None if raw is None else decode_aux(key, raw)

    def delete_aux(self, skey: bytes, name: str | None = None) -> None:
        """Delete one aux record of a session, or all of them (name=None)."""
        if name is not None:
            self.txn.delete("aux", aux_key(skey, name))
            return
        for key in [key for key, _ in self.txn.scan("aux", prefix=aux_key(skey, ""), values=False)]:
            self.txn.delete("aux", key)

    def save_counters(self) -> None:
        self.txn.put("meta", b"counters", json.dumps(self.counters).encode())
        for tenant, row in self._usage.items():
            if any(row.values()) or self._digest[tenant]:
                self.txn.put("usage", tenant.encode(), usage_row_bytes(row, self._digest[tenant]))
            else:
                self.txn.delete("usage", tenant.encode())


def recompute_usage(txn: ReadTxn) -> dict[str, tuple[TenantUsage, int]]:
    """Per-tenant usage and catalogue digest computed from scratch: every stored session
    (expired ones too, until collected) and the unique blocks it refers to. A session record
    that fails its check still counts as a session of the tenant its key names, without bytes."""
    sessions: dict[str, int] = {}
    digests: dict[str, int] = {}
    logical: dict[str, int] = {}
    chunks: dict[str, set[bytes]] = {}
    for key, raw in txn.scan("sessions"):
        tenant = split_session_key(key)[0]
        sessions[tenant] = sessions.get(tenant, 0) + 1
        digests[tenant] = digests.get(tenant, 0) ^ catalog_digest(key)
        try:
            record = decode_session(key, raw)
        except CorruptData as exc:
            log.error("session record unreadable while counting usage", extra={"fields": {"key": key.hex(), "error": str(exc)}})
            continue
        logical[tenant] = logical.get(tenant, 0) + record.kv_bytes
        chunks.setdefault(tenant, set()).update(ref.key for ref in record.blocks)
    usage = {}
    for tenant, count in sessions.items():
        stored = 0
        for chunk in chunks.get(tenant, ()):
            raw = txn.get("refs", chunk)
            if raw is not None:
                stored += REF.unpack(raw)[2]
        usage[tenant] = (TenantUsage(tenant, count, stored, logical.get(tenant, 0)), digests[tenant])
    return usage
