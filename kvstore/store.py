"""SessionStore: sessions made of deduplicated, checksummed KV blocks in tiers over LMDB.

A session is an ordered list of chunk references (BlockRef) plus its token ids and metadata. Plain
sessions use prefix-chain keys, so identical prefixes are one set of blocks with a reference
count; a block is freed when no session refers to it. Every operation that changes anything
(save, append, fork, delete, expiry) is a single LMDB write transaction.

Every request is checked (``kvstore.validation``) before anything is written, so nothing is
stored that cannot be read back. Per-tenant usage (sessions, stored bytes after dedup, logical
bytes) is kept in the ``usage`` sub-database inside the same transactions, and a write that
would take a tenant over its quota (``kvstore.quota``) aborts with CapacityExceeded.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import lmdb
import numpy as np
import torch

from kvstore.chunking import ROOT_KEY, block_storage_key, chain_key, chain_keys, chunk_ranges, private_key
from kvstore.codec import AuxRecord, Block, decode_aux, decode_session, encode_aux, encode_block, encode_session, require_little_endian
from kvstore.errors import AlreadyExists, CapacityExceeded, Conflict, CorruptData, InvalidRequest, NotFound
from kvstore.lmdb_backend import LmdbBackend, LmdbConfig
from kvstore.pieces import KVPieces
from kvstore.quota import Quota, TenantUsage, check_quota
from kvstore.records import BlockRef, SessionRecord
from kvstore.spec import DTYPE_CODES, ModelSpec
from kvstore.tiered import TieredBlockStore
from kvstore.tiers import MemoryTier
from kvstore.validation import (
    MAX_TTL_SECONDS,
    check_logical_bound,
    check_logical_length,
    positions_array,
    text_bytes,
    token_ids_array,
    validate_id,
    validate_labels,
    validate_ttl,
)

log = logging.getLogger("kvmem.store")
_REF = struct.Struct("<IIQ")  # refcount, layers, record bytes of all layers
_COUNTER_KEYS = ("sessions", "chunks", "stored_bytes", "logical_bytes")
_USAGE_KEYS = ("sessions", "stored_bytes", "logical_bytes")  # per tenant, in the "usage" sub-db
_USAGE_MARKER = b"tenant_usage"  # meta key: {"version": n} once per-tenant usage is complete
USAGE_VERSION = 1
_MAX_EXPIRES_MS = (1 << 63) - 1  # expires_at_ms is packed as >Q in the TTL index and int64 in aux


@dataclass(frozen=True)
class StoreConfig:
    data_dir: Path = Path("data")  # LMDB under <data_dir>/lmdb, the converted model under <data_dir>/models
    chunk_tokens: int = 256  # tokens per deduplicated chunk
    cpu_tier_bytes: int = 2 << 30  # CPU memory tier capacity
    gpu_tier_bytes: int = 1 << 30  # GPU memory tier capacity, used only when CUDA is available
    lmdb_map_bytes: int = 1 << 30  # initial LMDB map; doubles when full
    lmdb_max_map_bytes: int = 64 << 30  # hard ceiling on the LMDB map
    durable: bool = True  # fsync every commit before a write returns
    default_ttl_seconds: int = 0  # 0 = sessions never expire unless a request sets a TTL
    max_session_tokens: int = 1 << 20  # tokens in one session (SmolLM2 fp32: ~46 KB each)
    max_id_bytes: int = 256  # UTF-8 bytes of a tenant or session id (at most 256)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_tokens <= 65536:
            raise ValueError(f"store.chunk_tokens must be in 1..65536, got {self.chunk_tokens}")
        if not 0 <= self.default_ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"store.default_ttl_seconds must be in 0..{MAX_TTL_SECONDS} (ten years), got {self.default_ttl_seconds}")
        if not 1 <= self.max_session_tokens < 1 << 32:  # token counts are packed as u32
            raise ValueError(f"store.max_session_tokens must be in 1..{(1 << 32) - 1}, got {self.max_session_tokens}")
        if not 1 <= self.max_id_bytes <= 256:  # session keys (tenant + id) must fit LMDB's 511-byte keys
            raise ValueError(f"store.max_id_bytes must be in 1..256, got {self.max_id_bytes}")


@dataclass(frozen=True)
class WriteResult:
    record: SessionRecord
    deduplicated_tokens: int = 0
    bytes_written: int = 0
    shared_tokens: int = 0
    copied_tokens: int = 0


@dataclass(frozen=True)
class KVPiece:
    """One (layer, token range) of restored KV as raw bytes: keys/values [H, n, D], bias [H, n]."""

    layer: int
    token_start: int
    num_tokens: int
    keys: memoryview
    values: memoryview
    bias: memoryview | None


@dataclass
class RestorePlan:
    """What a restore returns: metadata now, KV pieces streamed lazily by ``pieces()``."""

    record: SessionRecord
    start: int
    end: int
    refs: list[BlockRef]
    num_pieces: int
    _load: Callable[[BlockRef], list[Block]] = field(repr=False)

    @property
    def token_ids(self) -> np.ndarray:
        return self.record.token_ids[self.start : self.end]

    @property
    def positions(self) -> np.ndarray:
        return self.record.positions_or_default()[self.start : self.end]

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        """The whole range in memory: per layer keys, values [H, n, D] and bias [H, n] (or None)."""
        from kvstore.pieces import tensor_raw_view

        spec = self.record.spec
        shape = (spec.num_kv_heads, self.end - self.start, spec.head_dim)
        keys = [torch.empty(shape, dtype=spec.torch_dtype) for _ in range(spec.num_layers)]
        values = [torch.empty(shape, dtype=spec.torch_dtype) for _ in range(spec.num_layers)]
        bias = [torch.empty(shape[:2]) for _ in range(spec.num_layers)] if self.record.has_bias else None
        raw = [(tensor_raw_view(k), tensor_raw_view(v)) for k, v in zip(keys, values)]
        for piece in self.pieces():
            lo, hi = piece.token_start - self.start, piece.token_start - self.start + piece.num_tokens
            k, v = raw[piece.layer]
            k[:, lo:hi] = np.frombuffer(piece.keys, dtype=k.dtype).reshape(shape[0], piece.num_tokens, shape[2])
            v[:, lo:hi] = np.frombuffer(piece.values, dtype=v.dtype).reshape(shape[0], piece.num_tokens, shape[2])
            if bias is not None:
                bias[piece.layer][:, lo:hi] = torch.from_numpy(np.frombuffer(piece.bias, dtype="<f4").reshape(shape[0], piece.num_tokens).copy())
        return keys, values, bias

    def pieces(self) -> Iterator[KVPiece]:
        for ref in self.refs:
            lo, hi = max(self.start, ref.start), min(self.end, ref.end)
            for block in self._load(ref):
                if lo == ref.start and hi == ref.end:
                    yield KVPiece(block.layer, lo, hi - lo, block.keys_bytes(), block.values_bytes(), block.bias_bytes() if block.has_bias else None)
                    continue
                keys, values, bias = block.raw_arrays()
                a, b = lo - ref.start, hi - ref.start
                sliced = [None if x is None else memoryview(np.ascontiguousarray(x[:, a:b])).cast("B") for x in (keys, values, bias)]
                yield KVPiece(block.layer, lo, hi - lo, *sliced)


def _usage_row(tenant: str, raw) -> TenantUsage:
    """A tenant's usage from its row in the "usage" sub-db (None: nothing stored)."""
    fields = dict.fromkeys(_USAGE_KEYS, 0) | (json.loads(bytes(raw)) if raw is not None else {})
    return TenantUsage(tenant, **{key: fields[key] for key in _USAGE_KEYS})


def _read_usage(txn: lmdb.Transaction, db, tenant: str) -> TenantUsage:
    return _usage_row(tenant, txn.get(tenant.encode(), db=db))


class _Txn:
    """Helpers bound to one write transaction: refcounts, counters, usage, session records.

    Whatever changes what a tenant stores takes the tenant explicitly (one transaction may
    touch several, e.g. expiry), so its usage row changes with the global counters.
    """

    def __init__(self, backend: LmdbBackend, txn: lmdb.Transaction):
        self.txn = txn
        self.db = backend.db
        raw = txn.get(b"counters", db=self.db["meta"])
        self.counters = dict.fromkeys(_COUNTER_KEYS, 0) | (json.loads(bytes(raw)) if raw is not None else {})
        self.freed: list[bytes] = []  # storage keys of blocks deleted in this transaction
        self.written: list[Block] = []
        self._usage_before: dict[str, TenantUsage] = {}  # tenant -> usage when first touched
        self._usage: dict[str, dict[str, int]] = {}  # tenant -> usage now (in this transaction)

    def _count(self, tenant: str, key: str, delta: int) -> None:
        """Add ``delta`` to a global counter and, when it is per tenant, to the tenant's."""
        self.counters[key] += delta
        if key in _USAGE_KEYS:
            row = self._usage.get(tenant)
            if row is None:
                before = _read_usage(self.txn, self.db["usage"], tenant)
                self._usage_before[tenant] = before
                row = self._usage[tenant] = {name: getattr(before, name) for name in _USAGE_KEYS}
            row[key] += delta

    def usage(self, tenant: str) -> TenantUsage:
        row = self._usage.get(tenant)
        return _read_usage(self.txn, self.db["usage"], tenant) if row is None else TenantUsage(tenant, **row)

    def check_quotas(self, quota_for: Callable[[str], Quota] | None) -> None:
        """CapacityExceeded if this transaction grows some tenant's usage past its quota."""
        if quota_for is None:
            return
        for tenant, before in self._usage_before.items():
            after = self.usage(tenant)
            if after.stored_bytes > before.stored_bytes or after.sessions > before.sessions:
                check_quota(before, after, quota_for(tenant))

    def incref(self, key: bytes) -> bool:
        """Add a reference to a stored chunk; False if it is not stored."""
        raw = self.txn.get(key, db=self.db["refs"])
        if raw is None:
            return False
        count, layers, nbytes = _REF.unpack(raw)
        self.txn.put(key, _REF.pack(count + 1, layers, nbytes), db=self.db["refs"])
        return True

    def put_chunk(self, tenant: str, key: bytes, blocks: list[Block]) -> int:
        """Store a new chunk (all layers) of ``tenant`` with one reference; returns bytes written."""
        nbytes = 0
        for block in blocks:
            self.txn.put(block.key, block.data, db=self.db["blocks"])
            nbytes += block.nbytes
        self.txn.put(key, _REF.pack(1, len(blocks), nbytes), db=self.db["refs"])
        self._count(tenant, "chunks", 1)
        self._count(tenant, "stored_bytes", nbytes)
        self.written.extend(blocks)
        return nbytes

    def decref(self, tenant: str, key: bytes) -> int:
        """Drop a reference; frees the chunk when it was the last. Returns bytes freed."""
        raw = self.txn.get(key, db=self.db["refs"])
        if raw is None:
            return 0
        count, layers, nbytes = _REF.unpack(raw)
        if count > 1:
            self.txn.put(key, _REF.pack(count - 1, layers, nbytes), db=self.db["refs"])
            return 0
        self.txn.delete(key, db=self.db["refs"])
        for layer in range(layers):
            storage_key = block_storage_key(key, layer)
            self.txn.delete(storage_key, db=self.db["blocks"])
            self.freed.append(storage_key)
        self._count(tenant, "chunks", -1)
        self._count(tenant, "stored_bytes", -nbytes)
        return nbytes

    def get_session(self, skey: bytes) -> SessionRecord | None:
        raw = self.txn.get(skey, db=self.db["sessions"])
        return None if raw is None else decode_session(skey, raw)

    def put_session(self, tenant: str, skey: bytes, record: SessionRecord, previous: SessionRecord | None) -> None:
        if previous is not None:
            self._unindex(tenant, skey, previous)
        else:
            self._count(tenant, "sessions", 1)
        self.txn.put(skey, encode_session(skey, record), db=self.db["sessions"])
        self._count(tenant, "logical_bytes", record.kv_bytes)
        if record.expires_at_ms:
            self.txn.put(_ttl_key(record.expires_at_ms, skey), b"", db=self.db["ttl"])

    def delete_session(self, tenant: str, skey: bytes, record: SessionRecord) -> int:
        freed = sum(self.decref(tenant, ref.key) for ref in record.blocks)
        self.delete_aux(skey)
        self._unindex(tenant, skey, record)
        self.txn.delete(skey, db=self.db["sessions"])
        self._count(tenant, "sessions", -1)
        return freed

    def _unindex(self, tenant: str, skey: bytes, record: SessionRecord) -> None:
        self._count(tenant, "logical_bytes", -record.kv_bytes)
        if record.expires_at_ms:
            self.txn.delete(_ttl_key(record.expires_at_ms, skey), db=self.db["ttl"])

    def put_aux(self, skey: bytes, name: str, record: SessionRecord, payload: bytes) -> None:
        key = aux_key(skey, name)
        self.txn.put(key, encode_aux(key, record.created_at_ms, record.version, payload), db=self.db["aux"])

    def get_aux(self, skey: bytes, name: str) -> AuxRecord | None:
        key = aux_key(skey, name)
        raw = self.txn.get(key, db=self.db["aux"])
        return None if raw is None else decode_aux(key, raw)

    def delete_aux(self, skey: bytes, name: str | None = None) -> None:
        """Delete one aux record of a session, or all of them (name=None)."""
        if name is not None:
            self.txn.delete(aux_key(skey, name), db=self.db["aux"])
            return
        prefix = aux_key(skey, "")
        cursor = self.txn.cursor(db=self.db["aux"])
        doomed = []
        if cursor.set_range(prefix):
            for key, _ in cursor:
                if not bytes(key).startswith(prefix):
                    break
                doomed.append(bytes(key))
        for key in doomed:
            self.txn.delete(key, db=self.db["aux"])

    def save_counters(self) -> None:
        self.txn.put(b"counters", json.dumps(self.counters).encode(), db=self.db["meta"])
        for tenant, row in self._usage.items():
            if any(row.values()):
                self.txn.put(tenant.encode(), json.dumps(row).encode(), db=self.db["usage"])
            else:
                self.txn.delete(tenant.encode(), db=self.db["usage"])


def recompute_usage(txn: lmdb.Transaction, db: dict) -> dict[str, TenantUsage]:
    """Per-tenant usage computed from scratch: every stored session (expired ones too, until
    collected) and the unique blocks it refers to. A session record that fails its check still
    counts as a session of the tenant its key names, without bytes."""
    sessions: dict[str, int] = {}
    logical: dict[str, int] = {}
    chunks: dict[str, set[bytes]] = {}
    cursor = txn.cursor(db=db["sessions"])
    for key, raw in cursor:
        key = bytes(key)
        tenant = key.split(b"\x00", 1)[0].decode(errors="replace")
        sessions[tenant] = sessions.get(tenant, 0) + 1
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
            raw = txn.get(chunk, db=db["refs"])
            if raw is not None:
                stored += _REF.unpack(raw)[2]
        usage[tenant] = TenantUsage(tenant, count, stored, logical.get(tenant, 0))
    return usage


def _ttl_key(expires_at_ms: int, skey: bytes) -> bytes:
    return struct.pack(">Q", expires_at_ms) + skey


# LMDB keys are at most 511 bytes; the longest derived key is an aux key (session key + 1 +
# name), so session keys stay within MAX_SESSION_KEY_BYTES and aux names within MAX_AUX_NAME_BYTES.
MAX_SESSION_KEY_BYTES = 440
MAX_AUX_NAME_BYTES = 64
_KEY_DIGEST_BYTES = 16


def session_key(tenant: str, session_id: str) -> bytes:
    """LMDB key of a session: ``tenant \\0 session_id``, sorted by tenant then id.

    When that would be longer than MAX_SESSION_KEY_BYTES (two ids near their 256-byte limit),
    the id is cut and a blake2b of the whole id follows a second NUL, giving every such key of a
    tenant one length. Ids never hold NUL, so a cut key never equals (or prefixes) a plain one;
    such sessions list in the order of their cut ids.
    """
    tenant_bytes, id_bytes = tenant.encode(), session_id.encode()
    key = tenant_bytes + b"\x00" + id_bytes
    if len(key) <= MAX_SESSION_KEY_BYTES:
        return key
    keep = MAX_SESSION_KEY_BYTES - len(tenant_bytes) - 2 - _KEY_DIGEST_BYTES
    digest = hashlib.blake2b(id_bytes, digest_size=_KEY_DIGEST_BYTES, person=b"kvmem-sid").digest()
    return tenant_bytes + b"\x00" + id_bytes[:keep] + b"\x00" + digest


def aux_key(skey: bytes, name: str) -> bytes:
    """Key of a session's aux record: its text ("text") or a derived index ("index/...")."""
    encoded = name.encode()
    if len(encoded) > MAX_AUX_NAME_BYTES:
        raise InvalidRequest(f"aux record name {name[:40]!r}... is {len(encoded)} bytes; the limit is {MAX_AUX_NAME_BYTES}")
    return skey + b"\x01" + encoded


TEXT_AUX = "text"


class SessionStore:
    """The domain API of kvmem's storage: save, restore, append, fork, lookup, delete, list."""

    def __init__(
        self,
        config: StoreConfig,
        backend: LmdbBackend,
        blocks: TieredBlockStore,
        clock: Callable[[], float] = time.time,
        *,
        quota_for: Callable[[str], Quota] | None = None,
    ):
        """``quota_for(tenant)`` gives a tenant's Quota (None: no quotas). It is read on every
        write, so assigning ``store.quota_for`` later (a reloaded key file) takes effect at once.
        ``open()`` also brings per-tenant usage up to date; build through it."""
        require_little_endian()
        self.config = config
        self.backend = backend
        self.blocks = blocks
        self.clock = clock
        self.quota_for = quota_for

    @classmethod
    def open(
        cls,
        config: StoreConfig,
        clock: Callable[[], float] = time.time,
        cuda_available: bool | None = None,
        *,
        quota_for: Callable[[str], Quota] | None = None,
    ) -> "SessionStore":
        """Open (or create) the store under config.data_dir with tiers sized by config.

        A data directory written before per-tenant usage existed gets it computed here, once."""
        import torch

        backend = LmdbBackend(LmdbConfig(Path(config.data_dir) / "lmdb", config.lmdb_map_bytes, config.lmdb_max_map_bytes, config.durable))
        tiers = []
        use_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
        if use_cuda and config.gpu_tier_bytes > 0:
            tiers.append(MemoryTier("gpu", config.gpu_tier_bytes, device="cuda"))
        if config.cpu_tier_bytes > 0:
            tiers.append(MemoryTier("cpu", config.cpu_tier_bytes))
        store = cls(config, backend, TieredBlockStore(backend, tiers), clock, quota_for=quota_for)
        store.upgrade_usage()
        return store

    def upgrade_usage(self) -> bool:
        """Compute per-tenant usage from scratch unless the marker says it is current; True if it
        was computed. Runs in one write transaction (so an interrupted upgrade is redone)."""

        def apply(txn: lmdb.Transaction) -> bool:
            db = self.backend.db
            raw = txn.get(_USAGE_MARKER, db=db["meta"])
            if raw is not None and json.loads(bytes(raw)).get("version") == USAGE_VERSION:
                return False
            usage = recompute_usage(txn, db)
            txn.drop(db["usage"], delete=False)
            for tenant, row in usage.items():
                txn.put(tenant.encode(), json.dumps({key: getattr(row, key) for key in _USAGE_KEYS}).encode(), db=db["usage"])
            txn.put(_USAGE_MARKER, json.dumps({"version": USAGE_VERSION}).encode(), db=db["meta"])
            return True

        computed = self.backend.write(apply)
        if computed:
            log.info("per-tenant usage computed", extra={"fields": {"data_dir": str(self.config.data_dir)}})
        return computed

    def close(self) -> None:
        self.backend.close()

    # ----------------------------------------------------------------- helpers
    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _expiry(self, ttl_seconds: int, now_ms: int) -> int:
        ttl = validate_ttl(ttl_seconds) or self.config.default_ttl_seconds
        expires = now_ms + ttl * 1000 if ttl > 0 else 0
        if not 0 <= expires <= _MAX_EXPIRES_MS:
            raise InvalidRequest(f"ttl_seconds {ttl} puts the expiry past what the store can record; use a shorter TTL")
        return expires

    def _validate_ids(self, tenant: str, session_id: str) -> None:
        validate_id(tenant, "tenant", self.config.max_id_bytes)
        validate_id(session_id, "session id", self.config.max_id_bytes)

    def _check_size(self, tokens: int) -> None:
        if tokens > self.config.max_session_tokens:
            raise CapacityExceeded(f"session of {tokens} tokens exceeds store.max_session_tokens={self.config.max_session_tokens}; split or compact it")

    def new_pieces(self, spec: ModelSpec, start: int, end: int, has_bias: bool = False) -> KVPieces:
        """A KVPieces collector for tokens [start, end), after checking the session size limit."""
        if not 0 <= start <= end:
            raise InvalidRequest(f"token range [{start}, {end}) must have 0 <= start <= end")
        self._check_size(end)
        return KVPieces(spec, start, end, has_bias)

    @staticmethod
    def _check_pieces_spec(spec: ModelSpec, pieces: KVPieces) -> None:
        if not isinstance(spec, ModelSpec):
            raise InvalidRequest(f"a model spec is required, got {type(spec).__name__}")
        layout = lambda s: (s.num_layers, s.num_kv_heads, s.head_dim, s.dtype)  # noqa: E731
        if layout(pieces.spec) != layout(spec):
            raise InvalidRequest(f"the KV was collected for layout {layout(pieces.spec)} but the spec says {layout(spec)} (layers, heads, head_dim, dtype)")

    def _encode_chunk(self, key: bytes, spec: ModelSpec, pieces: KVPieces, start: int, count: int) -> list[Block]:
        code = DTYPE_CODES[spec.torch_dtype]
        blocks = []
        for layer in range(spec.num_layers):
            keys, values, bias = pieces.block(layer, start, count)
            blocks.append(encode_block(block_storage_key(key, layer), layer, (spec.num_kv_heads, count, spec.head_dim), code, keys, values, bias))
        return blocks

    def _link_chunks(self, tx: _Txn, tenant: str, refs: list[BlockRef], encoded: dict[bytes, list[Block]], spec: ModelSpec, pieces: KVPieces, reused_until: int = 0) -> tuple[int, int]:
        """Reference every chunk of ``refs``: share stored ones, write the others from ``pieces``.

        Chunks starting before ``reused_until`` were not sent and must be stored already.
        Returns (deduplicated tokens, bytes written).
        """
        dedup = written = 0
        for ref in refs:
            if tx.incref(ref.key):
                dedup += ref.count
            elif ref.start < reused_until:
                raise Conflict(f"the prefix chunk at token {ref.start} is no longer stored; send the save again without reuse_prefix_tokens")
            else:  # encoded up front unless it vanished since the check (a concurrent delete)
                blocks = encoded.get(ref.key) or self._encode_chunk(ref.key, spec, pieces, ref.start, ref.count)
                written += tx.put_chunk(tenant, ref.key, blocks)
        return dedup, written

    def _missing_chunks(self, keys: list[bytes]) -> set[bytes]:
        with self.backend.read() as txn:
            return {key for key in keys if txn.get(key, db=self.backend.db["refs"]) is None}

    def _write(self, fn: Callable[[_Txn], WriteResult | int]):
        """Run ``fn`` in one write transaction; refuse (abort) it if it takes a tenant over quota."""
        def run(txn: lmdb.Transaction):
            helper = _Txn(self.backend, txn)
            result = fn(helper)
            helper.check_quotas(self.quota_for)
            helper.save_counters()
            return result, helper

        result, helper = self.backend.write(run)
        self.blocks.forget(helper.freed)
        self.blocks.cache(helper.written)
        return result

    def _read_record(self, tenant: str, session_id: str) -> SessionRecord:
        self._validate_ids(tenant, session_id)
        skey = session_key(tenant, session_id)
        with self.backend.read() as txn:
            raw = txn.get(skey, db=self.backend.db["sessions"])
            record = None if raw is None else decode_session(skey, raw)
        if record is None or record.is_expired(self._now_ms()):
            raise NotFound(f"session {session_id!r} of tenant {tenant!r} does not exist (never saved, deleted or expired)")
        return record

    # ----------------------------------------------------------------- save
    def save(
        self,
        tenant: str,
        session_id: str,
        spec: ModelSpec,
        token_ids: np.ndarray,
        pieces: KVPieces,
        *,
        positions: np.ndarray | None = None,
        logical_length: int = 0,
        ttl_seconds: int = 0,
        overwrite: bool = False,
        reuse_prefix_tokens: int = 0,
        labels: dict[str, str] | None = None,
        text: str | None = None,
    ) -> WriteResult:
        """Store a session atomically. ``pieces`` covers tokens [reuse_prefix_tokens, T).

        token_ids: uint32 [T]; positions: int64 [T] or None (0..T-1). ``text``: the session's
        text, kept beside it for text search (replaced, with every derived index, on overwrite).
        """
        self._validate_ids(tenant, session_id)
        self._check_pieces_spec(spec, pieces)
        validate_ttl(ttl_seconds)
        labels = validate_labels(labels)
        text_data = text_bytes(text)
        token_ids = token_ids_array(token_ids)
        total = len(token_ids)
        if total == 0:
            raise InvalidRequest("a session needs at least one token")
        self._check_size(total)
        if positions is not None:
            positions = positions_array(positions, total)
        logical_length = check_logical_length(logical_length, total, positions)
        if positions is None and logical_length != total:
            positions = np.arange(total, dtype=np.int64)  # a gap before logical_length: appends continue past it
        elif positions is not None and logical_length == total and np.array_equal(positions, np.arange(total)):
            positions = None  # plain 0..T-1 with nothing after: dedupable like any plain session
        has_bias = pieces.has_bias
        chained = positions is None and not has_bias
        if not isinstance(reuse_prefix_tokens, int) or reuse_prefix_tokens < 0:
            raise InvalidRequest(f"reuse_prefix_tokens must be a non-negative integer, got {reuse_prefix_tokens!r}")
        if pieces.start != reuse_prefix_tokens or pieces.end != total:
            raise InvalidRequest(f"KV covers tokens [{pieces.start}, {pieces.end}) but the session needs [{reuse_prefix_tokens}, {total})")
        chunk = self.config.chunk_tokens
        if reuse_prefix_tokens:
            if not chained:
                raise InvalidRequest("reuse_prefix_tokens only applies to plain sessions (no positions, no bias)")
            if reuse_prefix_tokens > total or (reuse_prefix_tokens % chunk and reuse_prefix_tokens != total):
                raise InvalidRequest(f"reuse_prefix_tokens={reuse_prefix_tokens} must be a multiple of the chunk size {chunk} and at most {total}")
        pieces.check_complete()

        ranges = chunk_ranges(0, total, chunk)
        keys = chain_keys(tenant, spec.digest(), token_ids, chunk) if chained else [private_key() for _ in ranges]
        missing = self._missing_chunks(keys)
        encoded = {
            key: self._encode_chunk(key, spec, pieces, start, count)
            for key, (start, count) in zip(keys, ranges)
            if key in missing and start >= reuse_prefix_tokens
        }
        now = self._now_ms()
        record = SessionRecord(
            tenant, session_id, spec, token_ids, [BlockRef(k, s, c) for k, (s, c) in zip(keys, ranges)],
            positions=positions, logical_length=logical_length, has_bias=has_bias, chained=chained,
            created_at_ms=now, updated_at_ms=now, expires_at_ms=self._expiry(ttl_seconds, now), labels=labels,
        )
        skey = session_key(tenant, session_id)

        def apply(tx: _Txn) -> WriteResult:
            previous = tx.get_session(skey)
            if previous is not None and not overwrite and not previous.is_expired(now):
                raise AlreadyExists(f"session {session_id!r} already exists; pass overwrite=true to replace it, or delete it first")
            dedup, written = self._link_chunks(tx, tenant, record.blocks, encoded, spec, pieces, reuse_prefix_tokens)
            if previous is not None:
                for old in previous.blocks:
                    tx.decref(tenant, old.key)
                tx.delete_aux(skey)
            tx.put_session(tenant, skey, record, previous)
            if text_data:
                tx.put_aux(skey, TEXT_AUX, record, text_data)
            return WriteResult(record, deduplicated_tokens=dedup, bytes_written=written)

        result = self._write(apply)
        log.info("session saved", extra={"fields": {"tenant": tenant, "session": session_id, "tokens": total, "dedup_tokens": result.deduplicated_tokens, "bytes_written": result.bytes_written}})
        return result

    # ----------------------------------------------------------------- restore
    def get(self, tenant: str, session_id: str) -> SessionRecord:
        return self._read_record(tenant, session_id)

    def restore(self, tenant: str, session_id: str, expected_spec: ModelSpec | None = None, start: int = 0, end: int = 0) -> RestorePlan:
        """Plan a restore of tokens [start, end) (end 0 = all); KV streams from ``plan.pieces()``."""
        record = self._read_record(tenant, session_id)
        if expected_spec is not None:
            record.spec.require_same(expected_spec, f"session {session_id!r}")
        return self._plan(record, start, end)

    def _plan(self, record: SessionRecord, start: int, end: int) -> RestorePlan:
        total = record.num_tokens
        end = end or total
        if not 0 <= start < end <= total:
            raise InvalidRequest(f"token range [{start}, {end}) is not inside the session's [0, {total})")
        refs = [ref for ref in record.blocks if ref.end > start and ref.start < end]
        layers = record.spec.num_layers
        return RestorePlan(record, start, end, refs, len(refs) * layers, lambda ref: self.blocks.get_chunk(ref.key, layers))

    def restore_prefix(self, tenant: str, spec: ModelSpec, token_ids: np.ndarray) -> RestorePlan:
        """Restore the longest stored prefix of token_ids (no session needed: blocks are content-addressed)."""
        validate_id(tenant, "tenant", self.config.max_id_bytes)
        token_ids = token_ids_array(token_ids)
        matched, keys = self._match_prefix(tenant, spec, token_ids)
        if matched == 0:
            raise NotFound("no stored prefix of these tokens for this tenant and model; prefill and save them first")
        chunk = self.config.chunk_tokens
        refs = [BlockRef(key, i * chunk, min(chunk, matched - i * chunk)) for i, key in enumerate(keys)]
        record = SessionRecord(tenant, "", spec, token_ids[:matched], refs, logical_length=matched)
        return self._plan(record, 0, matched)

    # ----------------------------------------------------------------- lookup
    def lookup(self, tenant: str, spec: ModelSpec, token_ids: np.ndarray) -> int:
        """Number of leading token_ids whose KV is stored for this tenant and model."""
        validate_id(tenant, "tenant", self.config.max_id_bytes)
        return self._match_prefix(tenant, spec, token_ids_array(token_ids))[0]

    def _match_prefix(self, tenant: str, spec: ModelSpec, token_ids: np.ndarray) -> tuple[int, list[bytes]]:
        chunk, digest, refs_db = self.config.chunk_tokens, spec.digest(), self.backend.db["refs"]
        matched, previous, keys = 0, ROOT_KEY, []
        with self.backend.read() as txn:
            while matched + chunk <= len(token_ids):
                key = chain_key(tenant, digest, previous, token_ids[matched : matched + chunk])
                if txn.get(key, db=refs_db) is None:
                    break
                keys.append(key)
                matched, previous = matched + chunk, key
            # a partial chunk is stored only where some session ends inside it: longest first
            for count in range(min(chunk - 1, len(token_ids) - matched), 0, -1):
                key = chain_key(tenant, digest, previous, token_ids[matched : matched + count])
                if txn.get(key, db=refs_db) is not None:
                    return matched + count, keys + [key]
        return matched, keys

    # ----------------------------------------------------------------- append
    def append(
        self,
        tenant: str,
        session_id: str,
        spec: ModelSpec,
        new_token_ids: np.ndarray,
        pieces: KVPieces,
        *,
        expected_num_tokens: int | None = None,
        ttl_seconds: int = 0,
        text: str | None = None,
    ) -> WriteResult:
        """Add the KV of new tokens; ``pieces`` covers [T_old, T_old + n). Atomic.

        ``text`` is appended to the session's stored text."""
        validate_ttl(ttl_seconds)
        text_data = text_bytes(text)
        record = self._read_record(tenant, session_id)
        if not isinstance(spec, ModelSpec):
            raise InvalidRequest(f"a model spec is required, got {type(spec).__name__}")
        record.spec.require_same(spec, f"session {session_id!r}")
        self._check_pieces_spec(spec, pieces)
        new_token_ids = token_ids_array(new_token_ids, "new token ids")
        old_total, added = record.num_tokens, len(new_token_ids)
        if added == 0:
            raise InvalidRequest("append needs at least one new token")
        self._check_size(old_total + added)  # token counts stay far below 2^62 (max_session_tokens < 2^32)
        check_logical_bound(record.logical_length + added, f"the logical length after the append ({record.logical_length} + {added})")
        if expected_num_tokens is not None and expected_num_tokens != old_total:
            raise Conflict(f"session {session_id!r} holds {old_total} tokens, not the expected {expected_num_tokens}; restore it and retry")
        if pieces.start != old_total or pieces.end != old_total + added:
            raise InvalidRequest(f"KV covers tokens [{pieces.start}, {pieces.end}) but the new tokens are [{old_total}, {old_total + added})")
        if pieces.has_bias != record.has_bias:
            raise InvalidRequest(f"session has_bias={record.has_bias} but the appended KV has_bias={pieces.has_bias}")
        pieces.check_complete()
        chunk = self.config.chunk_tokens
        tokens = np.concatenate([record.token_ids, new_token_ids])
        kept = list(record.blocks)
        replaced: list[BlockRef] = []
        if record.chained and kept and kept[-1].count < chunk:
            replaced = [kept.pop()]  # the partial tail chunk is rebuilt with the new tokens
            pieces = self._merge_tail(record, replaced[0], pieces)
        first = replaced[0].start if replaced else old_total
        ranges = chunk_ranges(first, len(tokens), chunk)
        if record.chained:
            previous = kept[-1].key if kept else ROOT_KEY
            keys = chain_keys(tenant, spec.digest(), tokens, chunk, previous=previous, start=first)
        else:
            keys = [private_key() for _ in ranges]
        missing = self._missing_chunks(keys)
        encoded = {key: self._encode_chunk(key, spec, pieces, s, c) for key, (s, c) in zip(keys, ranges) if key in missing}
        positions = record.positions
        logical = record.logical_length + added
        if positions is not None:
            positions = np.concatenate([positions, np.arange(record.logical_length, logical, dtype=np.int64)])
        now = self._now_ms()
        skey = session_key(tenant, session_id)

        def apply(tx: _Txn) -> WriteResult:
            current = tx.get_session(skey)
            if current is None or current.version != record.version or current.is_expired(now):
                raise Conflict(f"session {session_id!r} changed or vanished during the append; restore it and retry")
            new_refs = [BlockRef(k, s, c) for k, (s, c) in zip(keys, ranges)]
            _, written = self._link_chunks(tx, tenant, new_refs, encoded, spec, pieces)
            for ref in replaced:
                tx.decref(tenant, ref.key)
            updated = SessionRecord(
                tenant, session_id, record.spec, tokens, kept + new_refs, positions=positions, logical_length=logical,
                has_bias=record.has_bias, chained=record.chained, created_at_ms=record.created_at_ms, updated_at_ms=now,
                expires_at_ms=self._expiry(ttl_seconds, now) if ttl_seconds else record.expires_at_ms,
                parent_session_id=record.parent_session_id, fork_offset=record.fork_offset, version=record.version + 1,
                labels=record.labels,
            )
            tx.put_session(tenant, skey, updated, current)
            if text_data:
                old_text = tx.get_aux(skey, TEXT_AUX)
                tx.put_aux(skey, TEXT_AUX, updated, (old_text.payload if old_text else b"") + text_data)
            return WriteResult(updated, bytes_written=written)

        return self._write(apply)

    def _merge_tail(self, record: SessionRecord, tail: BlockRef, pieces: KVPieces) -> KVPieces:
        """KVPieces over [tail.start, end): the stored tail chunk followed by the new pieces."""
        merged = KVPieces(record.spec, tail.start, pieces.end, pieces.has_bias)
        for block in self.blocks.get_chunk(tail.key, record.spec.num_layers):
            merged.add(block.layer, tail.start, tail.count, block.dtype_code, block.keys_bytes(), block.values_bytes(), block.bias_bytes() if block.has_bias else None)
        for layer in range(record.spec.num_layers):
            keys, values, bias = pieces.block(layer, pieces.start, pieces.end - pieces.start)
            merged.add(layer, pieces.start, pieces.end - pieces.start, merged.dtype_code, keys, values, bias)
        merged.check_complete()
        return merged

    # ----------------------------------------------------------------- fork
    def fork(self, tenant: str, source_id: str, target_id: str, at_token: int | None = None, *, ttl_seconds: int = 0, overwrite: bool = False) -> WriteResult:
        """Copy-on-write branch: the target shares the source's chunks before ``at_token``."""
        self._validate_ids(tenant, target_id)
        validate_ttl(ttl_seconds)
        source = self._read_record(tenant, source_id)
        total = source.num_tokens
        at = total if at_token is None else at_token
        if not isinstance(at, int) or isinstance(at, bool) or not 1 <= at <= total:
            raise InvalidRequest(f"fork offset {at} must be in 1..{total} (the source's token count)")
        shared = [ref for ref in source.blocks if ref.end <= at]
        boundary = next((ref for ref in source.blocks if ref.start < at < ref.end), None)
        new_blocks: list[Block] = []
        new_ref = None
        if boundary is not None:
            count = at - boundary.start
            if source.chained:
                previous = shared[-1].key if shared else ROOT_KEY
                key = chain_key(tenant, source.spec.digest(), previous, source.token_ids[boundary.start : at])
            else:
                key = private_key()
            pieces = KVPieces(source.spec, boundary.start, at, source.has_bias)
            for block in self.blocks.get_chunk(boundary.key, source.spec.num_layers):
                keys, values, bias = block.raw_arrays()
                pieces.add(block.layer, boundary.start, count, block.dtype_code, *(None if x is None else memoryview(np.ascontiguousarray(x[:, :count])).cast("B") for x in (keys, values, bias)))
            new_blocks = self._encode_chunk(key, source.spec, pieces, boundary.start, count)
            new_ref = BlockRef(key, boundary.start, count)
        positions = None if source.positions is None else source.positions[:at].copy()
        logical = at if source.positions is None else (source.logical_length if at == total else int(source.positions[at]))
        now = self._now_ms()
        target = SessionRecord(
            tenant, target_id, source.spec, source.token_ids[:at].copy(), shared + ([new_ref] if new_ref else []),
            positions=positions, logical_length=logical, has_bias=source.has_bias, chained=source.chained,
            created_at_ms=now, updated_at_ms=now, expires_at_ms=self._expiry(ttl_seconds, now),
            parent_session_id=source_id, fork_offset=at,
        )
        source_key, target_key = session_key(tenant, source_id), session_key(tenant, target_id)

        def apply(tx: _Txn) -> WriteResult:
            current = tx.get_session(source_key)
            if current is None or current.version != source.version:
                raise Conflict(f"session {source_id!r} changed or vanished during the fork; retry")
            previous = tx.get_session(target_key)
            if previous is not None and not overwrite and not previous.is_expired(now):
                raise AlreadyExists(f"session {target_id!r} already exists; pass overwrite=true to replace it")
            for ref in shared:
                if not tx.incref(ref.key):
                    raise Conflict(f"a chunk of {source_id!r} vanished during the fork; retry")
            if new_ref is not None and not tx.incref(new_ref.key):
                tx.put_chunk(tenant, new_ref.key, new_blocks)
            if previous is not None:
                for old in previous.blocks:
                    tx.decref(tenant, old.key)
                tx.delete_aux(target_key)
            tx.put_session(tenant, target_key, target, previous)
            source_text = tx.get_aux(source_key, TEXT_AUX) if at == total else None
            if source_text is not None:
                tx.put_aux(target_key, TEXT_AUX, target, source_text.payload)
            copied = new_ref.count if new_ref else 0
            return WriteResult(target, shared_tokens=at - copied, copied_tokens=copied)

        return self._write(apply)

    # ----------------------------------------------------------------- aux records
    def get_aux(self, tenant: str, session_id: str, name: str) -> AuxRecord | None:
        """A session's aux record, or None. Raises CorruptData when it fails its check."""
        skey = session_key(tenant, session_id)
        with self.backend.read() as txn:
            key = aux_key(skey, name)
            raw = txn.get(key, db=self.backend.db["aux"])
            return None if raw is None else decode_aux(key, raw)

    def put_aux(self, tenant: str, session_id: str, records: dict[str, bytes], derived_from: SessionRecord) -> None:
        """Attach ``records`` (name -> payload) to the session in one transaction, each tagged
        with the generation it was derived from.

        Raises Conflict when the session changed (or vanished) since ``derived_from`` was read:
        a derived index of an older generation is never stored as current.
        """
        skey = session_key(tenant, session_id)

        def apply(tx: _Txn) -> int:
            current = tx.get_session(skey)
            if current is None or current.version != derived_from.version or current.created_at_ms != derived_from.created_at_ms:
                raise Conflict(f"session {session_id!r} changed while {', '.join(records)} was being built; build it again")
            for name, payload in records.items():
                tx.put_aux(skey, name, current, payload)
            return 0

        self._write(apply)

    def delete_aux(self, tenant: str, session_id: str, name: str) -> None:
        skey = session_key(tenant, session_id)
        self._write(lambda tx: tx.delete_aux(skey, name) or 0)

    def session_text(self, tenant: str, session_id: str) -> str | None:
        """The text saved with the session, or None when it was saved without text."""
        self._read_record(tenant, session_id)
        aux = self.get_aux(tenant, session_id, TEXT_AUX)
        return None if aux is None else aux.payload.decode()

    # ----------------------------------------------------------------- delete / list / ttl
    def delete(self, tenant: str, session_id: str) -> int:
        """Delete a session; returns bytes freed (chunks no other session used)."""
        self._validate_ids(tenant, session_id)
        skey = session_key(tenant, session_id)

        def apply(tx: _Txn) -> int:
            record = tx.get_session(skey)
            if record is None:
                raise NotFound(f"session {session_id!r} of tenant {tenant!r} does not exist")
            return tx.delete_session(tenant, skey, record)

        return self._write(apply)

    def list(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SessionRecord], str]:
        """Sessions of a tenant in id order; returns (page, next_page_token or "")."""
        validate_id(tenant, "tenant", self.config.max_id_bytes)
        page_size = min(max(page_size or 100, 1), 1000)
        prefix = tenant.encode() + b"\x00"
        try:
            start = base64.urlsafe_b64decode(page_token.encode()) if page_token else prefix
        except ValueError:
            raise InvalidRequest("page_token is not one this server issued; start again with an empty token") from None
        if not start.startswith(prefix):
            raise InvalidRequest("page_token belongs to another tenant or is malformed; start again with an empty token")
        now, page, next_token = self._now_ms(), [], ""
        with self.backend.read() as txn:
            cursor = txn.cursor(db=self.backend.db["sessions"])
            if cursor.set_range(start):
                for key, raw in cursor:
                    key = bytes(key)
                    if not key.startswith(prefix):
                        break
                    if len(page) == page_size:
                        next_token = base64.urlsafe_b64encode(key).decode()
                        break
                    record = decode_session(key, raw)
                    if not record.is_expired(now):
                        page.append(record)
        return page, next_token

    def collect_expired(self) -> int:
        """Delete every session whose TTL has passed; returns how many."""
        now = self._now_ms()
        bound = struct.pack(">Q", now + 1)

        def apply(tx: _Txn) -> int:
            cursor = tx.txn.cursor(db=tx.db["ttl"])
            due = []
            if cursor.first():
                for key, _ in cursor:
                    key = bytes(key)
                    if key[:8] >= bound:
                        break
                    due.append(key)
            removed = 0
            for index_key in due:
                skey = index_key[8:]
                record = tx.get_session(skey)
                if record is not None and record.is_expired(now):
                    tx.delete_session(record.tenant, skey, record)
                    removed += 1
                else:  # stale index entry: the session was refreshed or replaced
                    tx.txn.delete(index_key, db=tx.db["ttl"])
            return removed

        removed = self._write(apply)
        if removed:
            log.info("expired sessions collected", extra={"fields": {"count": removed}})
        return removed

    # ----------------------------------------------------------------- usage / stats
    def usage(self, tenant: str) -> TenantUsage:
        """What ``tenant`` stores now: sessions (expired ones until collected), bytes of blocks
        stored for it after deduplication, and bytes its sessions refer to before it."""
        validate_id(tenant, "tenant", self.config.max_id_bytes)
        with self.backend.read() as txn:
            return _read_usage(txn, self.backend.db["usage"], tenant)

    def usage_by_tenant(self, limit: int = 10_000) -> list[TenantUsage]:
        """Every tenant's usage (at most ``limit`` tenants, in tenant order), for metrics."""
        found = []
        with self.backend.read() as txn:
            for key, raw in txn.cursor(db=self.backend.db["usage"]):
                if len(found) >= limit:
                    break
                found.append(_usage_row(bytes(key).decode("utf-8", "replace"), raw))
        return found

    def stats(self) -> dict:
        with self.backend.read() as txn:
            raw = txn.get(b"counters", db=self.backend.db["meta"])
            counters = dict.fromkeys(_COUNTER_KEYS, 0) | (json.loads(bytes(raw)) if raw is not None else {})
        tiers = [
            {"name": tier.name, "bytes_used": tier.bytes_used(), "capacity_bytes": tier.capacity(), "entries": len(tier), **vars(tier.counters)}
            for tier in self.blocks.tiers
        ]
        lmdb_counters = self.blocks.lmdb_counters
        used = self.backend.used_bytes()
        tiers.append({
            "name": "lmdb", "bytes_used": used, "capacity_bytes": self.config.lmdb_max_map_bytes,
            "entries": counters["chunks"], **vars(lmdb_counters),
        })
        return {
            **counters,
            "tiers": tiers,
            "lmdb_map_bytes": self.backend.map_bytes,
            "lmdb_used_bytes": used,
            "chunk_tokens": self.config.chunk_tokens,
        }
