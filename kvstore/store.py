"""SessionStore: sessions made of deduplicated, checksummed KV blocks in tiers over a backend.

A session is an ordered list of chunk references (BlockRef) plus its token ids and metadata. Plain
sessions use prefix-chain keys, so identical prefixes are one set of blocks with a reference
count; a block is freed when no session refers to it.

Writes stream: a save or append is opened at its header (``begin_save`` / ``begin_append``,
every check that needs no KV runs there), its blocks are written as they arrive
(``kvstore.staging``, invisible), and ``commit()`` writes the session record in one transaction
of the backend (``kvstore.backend``): that record is the commit point. Fork, delete and expiry
are single transactions too.

Every request is checked (``kvstore.validation``) before anything is written, so nothing is
stored that cannot be read back. Per-tenant usage and the catalogue digest (``kvstore.txn``) are
kept in the same transactions, and a write that would take a tenant over its quota
(``kvstore.quota``) aborts with CapacityExceeded. Damage is reported, never hidden:
``kvstore.catalog`` tells a damaged catalogue from a short one.
"""
from __future__ import annotations

import base64
import json
import logging
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from kvstore import catalog
from kvstore.chunking import ROOT_KEY, block_storage_key, chain_key, chain_keys, chunk_ranges, private_key
from kvstore.codec import AuxRecord, Block, decode_aux, decode_session, encode_block, require_little_endian
from kvstore.errors import AlreadyExists, CapacityExceeded, Conflict, CorruptData, InvalidRequest, NotFound
from kvstore.keys import aux_key, session_key, tenant_prefix  # noqa: F401 - re-exported
from kvstore.lmdb_backend import LmdbBackend, LmdbConfig
from kvstore.pieces import KVPieces
from kvstore.quota import Quota, TenantUsage
from kvstore.records import BlockRef, SessionRecord
from kvstore.record_cache import DecodedRecords
from kvstore.spec import DTYPE_CODES, ModelSpec
from kvstore.staging import ChunkPlan, InflightBudget, LiveOwners, StagedWrite, sweep
from kvstore.tiered import MissingBlock, TieredBlockStore
from kvstore.tiers import MemoryTier
from kvstore.txn import USAGE_MARKER, USAGE_VERSION, CatalogTxn, parse_usage_row, read_counters, read_usage, recompute_usage, usage_row_bytes
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
_MAX_EXPIRES_MS = (1 << 63) - 1  # expires_at_ms is packed as >Q in the TTL index and int64 in aux
_DISK_SHARE = 2  # auto max_session_bytes: at most half the disk


@dataclass(frozen=True)
class StoreConfig:
    data_dir: Path = Path("data")  # LMDB under <data_dir>/lmdb, the converted model under <data_dir>/models
    chunk_tokens: int = 256  # tokens per deduplicated chunk
    cpu_tier_bytes: int = 2 << 30  # CPU memory tier: blocks read recently (restores fill it, saves do not)
    lmdb_map_bytes: int = 1 << 30  # initial LMDB map; doubles when full
    lmdb_max_map_bytes: int = 64 << 30  # hard ceiling on the LMDB map
    durable: bool = True  # fsync every commit before a write returns (concurrent writes share one)
    default_ttl_seconds: int = 0  # 0 = sessions never expire unless a request sets a TTL
    max_session_tokens: int = 1 << 20  # tokens in one session (SmolLM2 fp32: ~46 KB each)
    max_session_bytes: int = 0  # KV bytes of one session; 0 = lmdb_max_map_bytes, at most half the disk's size
    inflight_bytes: int = 256 << 20  # KV held in memory by all unfinished writes together (RESOURCE_EXHAUSTED past it)
    staged_max_age_seconds: int = 3600  # the periodic sweep removes blocks staged by streams gone this long
    scrub_bytes_per_second: int = 0  # background scrub rate over every stored block (0 = off)
    max_id_bytes: int = 256  # UTF-8 bytes of a tenant or session id (at most 256)
    record_cache_bytes: int = 64 << 20  # session records kept decoded, checked against the stored bytes on every read (a 256k-token record: ~2 MB)
    backend: str = "lmdb"  # "lmdb": one file under data_dir; "redis": Redis Cluster / Redis / Valkey shared by servers
    redis_url: str = "redis://127.0.0.1:6379"  # any node of the cluster (rediss:// for TLS; user:password@ when set)
    redis_namespace: str = "kvmem"  # key prefix: stores sharing one cluster keep apart by it
    redis_min_replicas: int = 0  # a write returns only once this many replicas acknowledged it (WAIT)
    redis_timeout_seconds: float = 5.0  # one Redis command, and the WAIT for replicas
    redis_failover_seconds: float = 30.0  # calls retry through a failover this long, then UNAVAILABLE

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_tokens <= 65536:
            raise ValueError(f"store.chunk_tokens must be in 1..65536, got {self.chunk_tokens}")
        if not 0 <= self.default_ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"store.default_ttl_seconds must be in 0..{MAX_TTL_SECONDS} (ten years), got {self.default_ttl_seconds}")
        if not 1 <= self.max_session_tokens < 1 << 32:  # token counts are packed as u32
            raise ValueError(f"store.max_session_tokens must be in 1..{(1 << 32) - 1}, got {self.max_session_tokens}")
        if not 1 <= self.max_id_bytes <= 256:  # session keys (tenant + id) must fit LMDB's 511-byte keys
            raise ValueError(f"store.max_id_bytes must be in 1..256, got {self.max_id_bytes}")
        for name in ("max_session_bytes", "scrub_bytes_per_second", "cpu_tier_bytes", "staged_max_age_seconds", "record_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"store.{name} must be >= 0, got {getattr(self, name)}")
        if self.backend not in ("lmdb", "redis"):
            raise ValueError(f"store.backend must be \"lmdb\" or \"redis\", got {self.backend!r}")
        if self.inflight_bytes < 1 << 20:
            raise ValueError(f"store.inflight_bytes must be at least 1 MiB (one block being filled per stream), got {self.inflight_bytes}")

    def session_bytes_limit(self) -> int:
        """The effective max_session_bytes: as configured, or (0) the LMDB ceiling, at most half
        the size of the disk that holds data_dir. Memory does not bound it: writes stream."""
        if self.max_session_bytes:
            return self.max_session_bytes
        limit = self.lmdb_max_map_bytes
        probe = Path(self.data_dir)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            limit = min(limit, shutil.disk_usage(probe).total // _DISK_SHARE)
        except OSError:
            pass
        return limit


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


TEXT_AUX = "text"


class OpenWrite:
    """A save or append accepted at its header: ``add`` pieces as they arrive, then ``commit``
    (or ``abort``). Its blocks are written while it is open; only the commit makes them visible."""

    def __init__(self, staged: StagedWrite, commit: Callable[[StagedWrite], WriteResult]):
        self.staged = staged
        self._commit = commit

    @property
    def bytes_received(self) -> int:
        return self.staged.bytes_received

    def add(self, layer: int, token_start: int, count: int, dtype_code: int, keys, values, bias=None) -> None:
        """One piece: keys/values bytes-like [H, n, D] raw little-endian, bias float32 [H, n]."""
        self.staged.add(layer, token_start, count, dtype_code, keys, values, bias)

    def commit(self) -> WriteResult:
        try:
            self.staged.finish()
            self.staged.confirm_durable()
            result = self._commit(self.staged)
        except BaseException as failure:
            try:
                self.abort()
            except Exception as cleanup:  # noqa: BLE001 - the commit's own error is what the caller must see
                # the staged blocks stay until the periodic sweep removes them (store.staged_max_age_seconds)
                log.warning("abort after a failed commit failed", extra={"fields": {"commit_error": str(failure)[:200], "abort_error": str(cleanup)[:200]}})
            raise
        self.staged.committed()
        return result

    def abort(self) -> None:
        """Drop the write; safe to call more than once and after a failed commit."""
        self.staged.abort()


def open_backend(config: StoreConfig, readonly: bool = False):
    """The durable backend config.backend names (``kvstore.backend``)."""
    if config.backend == "redis":
        from kvstore.redis_backend import RedisBackend, RedisConfig

        return RedisBackend(RedisConfig(config.redis_url, config.redis_namespace, config.redis_min_replicas,
                                        config.redis_timeout_seconds, config.redis_failover_seconds))
    return LmdbBackend(LmdbConfig(Path(config.data_dir) / "lmdb", config.lmdb_map_bytes, config.lmdb_max_map_bytes, config.durable, readonly=readonly))


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
        ``open()`` also sweeps staged blocks and brings per-tenant usage up to date; build through it."""
        require_little_endian()
        self.config = config
        self.backend = backend
        self.blocks = blocks
        self.clock = clock
        self.quota_for = quota_for
        self.budget = InflightBudget(config.inflight_bytes)
        self.owners = LiveOwners()
        self.session_bytes_limit = config.session_bytes_limit()
        self.damaged_tenants: dict[str, str] = {}  # tenant -> what the start-up catalogue check found
        self.records = DecodedRecords(config.record_cache_bytes)  # decoded once per stored version (kvstore/record_cache.py)

    @classmethod
    def open(
        cls,
        config: StoreConfig,
        clock: Callable[[], float] = time.time,
        *,
        quota_for: Callable[[str], Quota] | None = None,
        readonly: bool = False,
    ) -> "SessionStore":
        """Open (or create) the store under config.data_dir with tiers sized by config.

        At start: blocks staged by streams that never committed are removed, per-tenant usage
        is computed once for a data directory that lacks it, and every tenant's catalogue is
        checked (damage is logged and kept in ``damaged_tenants``). ``readonly`` opens for
        inspection only (verify, backup, salvage): no writer, no sweep, no upgrade.
        """
        shared = config.backend == "redis"
        backend = open_backend(config, readonly)
        tiers = [MemoryTier("cpu", config.cpu_tier_bytes)] if config.cpu_tier_bytes > 0 else []
        store = cls(config, backend, TieredBlockStore(backend, tiers), clock, quota_for=quota_for)
        try:
            if not readonly:
                # a shared backend: other servers' streams are live, so only entries past the age limit go
                entries, blocks = sweep(backend, None, config.staged_max_age_seconds) if shared else sweep(backend)
                if entries:
                    log.warning("staged blocks of unfinished writes removed", extra={"fields": {"entries": entries, "blocks": blocks}})
                store.upgrade_usage()
            store.damaged_tenants = catalog.check_all(backend)
        except BaseException:
            backend.close()
            raise
        for tenant, problem in store.damaged_tenants.items():
            log.error("session catalogue damaged", extra={"fields": {"tenant": tenant, "problem": problem}})
        return store

    def upgrade_usage(self) -> bool:
        """Compute per-tenant usage from scratch unless the marker says it is current; True if it
        was computed. Runs in one write transaction (so an interrupted upgrade is redone)."""

        def apply(txn) -> bool:
            raw = txn.get("meta", USAGE_MARKER)
            try:
                current = raw is not None and json.loads(bytes(raw)).get("version") == USAGE_VERSION
            except (ValueError, AttributeError):
                current = False  # an unreadable marker: recompute (usage is derived data)
            if current:
                return False
            usage = recompute_usage(txn)
            txn.clear("usage")
            for tenant, (row, digest) in usage.items():
                txn.put("usage", tenant.encode(), usage_row_bytes(vars(row), digest))
            txn.put("meta", USAGE_MARKER, json.dumps({"version": USAGE_VERSION}).encode())
            return True

        computed = self.backend.write(apply)
        if computed:
            log.info("per-tenant usage computed", extra={"fields": {"data_dir": str(self.config.data_dir)}})
        return computed

    def sweep_staged(self) -> tuple[int, int]:
        """Remove blocks staged by write streams that ended without commit or abort (periodic)."""
        return sweep(self.backend, self.owners, self.config.staged_max_age_seconds)

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

    def _check_size(self, tokens: int, spec: ModelSpec | None = None) -> None:
        if tokens > self.config.max_session_tokens:
            raise CapacityExceeded(f"session of {tokens} tokens exceeds store.max_session_tokens={self.config.max_session_tokens}; split or compact it")
        if spec is not None and tokens * spec.bytes_per_token > self.session_bytes_limit:
            raise CapacityExceeded(
                f"session of {tokens} tokens holds {tokens * spec.bytes_per_token} bytes of KV, over the limit of "
                f"{self.session_bytes_limit} (store.max_session_bytes; by default the LMDB ceiling store.lmdb_max_map_bytes, at most half the disk); "
                "split or compact it"
            )

    def new_pieces(self, spec: ModelSpec, start: int, end: int, has_bias: bool = False) -> KVPieces:
        """A KVPieces collector for tokens [start, end), after checking the session size limit."""
        if not 0 <= start <= end:
            raise InvalidRequest(f"token range [{start}, {end}) must have 0 <= start <= end")
        self._check_size(end, spec)
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

    def _staged_write(self, spec: ModelSpec, start: int, end: int, has_bias: bool, refs: list[BlockRef], *, prefill: dict | None = None) -> StagedWrite:
        """A StagedWrite for the chunks ``refs`` (covering [refs[0].start, end)); chunks already
        stored, or wholly before ``start``, are not written again."""
        with self.backend.read() as txn:
            stored = {ref.key for ref in refs if txn.get("refs", ref.key) is not None}
        plans = [ChunkPlan(ref.key, ref.start, ref.count, write=ref.key not in stored and ref.end > start) for ref in refs]
        return StagedWrite(self.backend, self.budget, self.owners, spec, start, end, has_bias, plans, self.config.chunk_tokens, prefill=prefill)

    def _link_chunks(self, tx: CatalogTxn, tenant: str, refs: list[BlockRef], staged: StagedWrite, reused_until: int = 0) -> tuple[int, int]:
        """Reference every chunk of ``refs``: share stored ones, link the ones ``staged`` wrote.

        Returns (deduplicated tokens, bytes written). Conflict when a chunk that was stored when
        the write began is gone (a concurrent delete): the client sends the write again.
        """
        dedup = written = 0
        layers = staged.spec.num_layers
        for key, data in staged.pending_blocks():
            tx.txn.put_if_absent("blocks", key, data)
        written_chunks = staged.written_chunks()
        plans = {plan.key: plan for plan in staged.chunks}
        for ref in refs:
            if tx.incref(ref.key):
                dedup += ref.count
            elif ref.key in written_chunks:  # every layer staged; a staged entry keeps them from deletion
                written += tx.link_chunk(tenant, ref.key, layers, staged.record_bytes(plans[ref.key]))
            elif ref.start < reused_until:
                raise Conflict(f"the prefix chunk at token {ref.start} is no longer stored; send the save again without reuse_prefix_tokens")
            else:
                raise Conflict(f"the stored chunk at token {ref.start} that this write shares was deleted meanwhile; send the write again")
        for key in staged.staged_keys():
            tx.txn.delete("staged", key)
        return dedup, written

    def _write(self, fn: Callable[[CatalogTxn], WriteResult | int]):
        """Run ``fn`` in one write transaction; refuse (abort) it if it takes a tenant over quota."""
        def run(txn):
            helper = CatalogTxn(txn)
            result = fn(helper)
            helper.check_quotas(self.quota_for)
            helper.save_counters()
            return result, helper.freed

        result, freed = self.backend.write(run)
        self.blocks.forget(freed)
        return result

    def _read_record(self, tenant: str, session_id: str) -> SessionRecord:
        self._validate_ids(tenant, session_id)
        skey = session_key(tenant, session_id)
        with self.backend.read() as txn:
            raw = txn.get("sessions", skey)
            if raw is None:
                problem = catalog.check_tenant(txn, tenant, strict=True)
                if problem is not None:
                    raise CorruptData(f"session {session_id!r} of tenant {tenant!r} was not found, and {problem}")
                record = None
            else:
                record = self.records.decode(skey, raw)
        if record is None or record.is_expired(self._now_ms()):
            raise NotFound(f"session {session_id!r} of tenant {tenant!r} does not exist (never saved, deleted or expired)")
        return record

    # ----------------------------------------------------------------- save
    def begin_save(
        self,
        tenant: str,
        session_id: str,
        spec: ModelSpec,
        token_ids: np.ndarray,
        *,
        has_bias: bool = False,
        positions: np.ndarray | None = None,
        logical_length: int = 0,
        ttl_seconds: int = 0,
        overwrite: bool = False,
        reuse_prefix_tokens: int = 0,
        labels: dict[str, str] | None = None,
        text: str | None = None,
    ) -> OpenWrite:
        """Open a save of a session; its KV (tokens [reuse_prefix_tokens, T)) is added to the
        returned OpenWrite as it arrives, and ``commit()`` stores the session atomically.

        token_ids: uint32 [T]; positions: int64 [T] or None (0..T-1). ``text``: the session's
        text, kept beside it for text search (replaced, with every derived index, on overwrite).
        """
        self._validate_ids(tenant, session_id)
        if not isinstance(spec, ModelSpec):
            raise InvalidRequest(f"a model spec is required, got {type(spec).__name__}")
        validate_ttl(ttl_seconds)
        labels = validate_labels(labels)
        text_data = text_bytes(text)
        token_ids = token_ids_array(token_ids)
        total = len(token_ids)
        if total == 0:
            raise InvalidRequest("a session needs at least one token")
        self._check_size(total, spec)
        if positions is not None:
            positions = positions_array(positions, total)
        logical_length = check_logical_length(logical_length, total, positions)
        if positions is None and logical_length != total:
            positions = np.arange(total, dtype=np.int64)  # a gap before logical_length: appends continue past it
        elif positions is not None and logical_length == total and np.array_equal(positions, np.arange(total)):
            positions = None  # plain 0..T-1 with nothing after: dedupable like any plain session
        chained = positions is None and not has_bias
        if not isinstance(reuse_prefix_tokens, int) or isinstance(reuse_prefix_tokens, bool) or reuse_prefix_tokens < 0:
            raise InvalidRequest(f"reuse_prefix_tokens must be a non-negative integer, got {reuse_prefix_tokens!r}")
        chunk = self.config.chunk_tokens
        if reuse_prefix_tokens:
            if not chained:
                raise InvalidRequest("reuse_prefix_tokens only applies to plain sessions (no positions, no bias)")
            if reuse_prefix_tokens > total or (reuse_prefix_tokens % chunk and reuse_prefix_tokens != total):
                raise InvalidRequest(f"reuse_prefix_tokens={reuse_prefix_tokens} must be a multiple of the chunk size {chunk} and at most {total}")
        ranges = chunk_ranges(0, total, chunk)
        keys = chain_keys(tenant, spec.digest(), token_ids, chunk) if chained else [private_key() for _ in ranges]
        now = self._now_ms()
        record = SessionRecord(
            tenant, session_id, spec, token_ids, [BlockRef(k, s, c) for k, (s, c) in zip(keys, ranges)],
            positions=positions, logical_length=logical_length, has_bias=has_bias, chained=chained,
            created_at_ms=now, updated_at_ms=now, expires_at_ms=self._expiry(ttl_seconds, now), labels=labels,
        )
        skey = session_key(tenant, session_id)
        with self.backend.read() as txn:  # refuse early; the commit checks again
            raw = txn.get("sessions", skey)
        if raw is not None and not overwrite:
            try:
                exists = not decode_session(skey, raw).is_expired(now)
            except CorruptData:
                exists = True
            if exists:
                raise AlreadyExists(f"session {session_id!r} already exists; pass overwrite=true to replace it, or delete it first")

        def commit(staged: StagedWrite) -> WriteResult:
            def apply(tx: CatalogTxn) -> WriteResult:
                previous, damaged = catalog.get_session_or_damage(tx.txn, skey)
                if (previous is not None or damaged) and not overwrite and not (previous is not None and previous.is_expired(now)):
                    raise AlreadyExists(f"session {session_id!r} already exists; pass overwrite=true to replace it, or delete it first")
                dedup, written = self._link_chunks(tx, tenant, record.blocks, staged, reuse_prefix_tokens)
                if previous is not None:
                    for old in previous.blocks:
                        tx.decref(tenant, old.key)
                if previous is not None or damaged:
                    tx.delete_aux(skey)
                tx.put_session(tenant, skey, record, previous, replaces=damaged)
                if text_data:
                    tx.put_aux(skey, TEXT_AUX, record, text_data)
                return WriteResult(record, deduplicated_tokens=dedup, bytes_written=written)

            result = self._write(apply)
            log.info("session saved", extra={"fields": {"tenant": tenant, "session": session_id, "tokens": total, "dedup_tokens": result.deduplicated_tokens, "bytes_written": result.bytes_written}})
            return result

        return OpenWrite(self._staged_write(spec, reuse_prefix_tokens, total, has_bias, record.blocks), commit)

    def save(self, tenant: str, session_id: str, spec: ModelSpec, token_ids: np.ndarray, pieces: KVPieces, **options) -> WriteResult:
        """Store a session atomically from KV in process memory. ``pieces`` covers tokens
        [reuse_prefix_tokens, T); ``options`` are those of ``begin_save``."""
        self._check_pieces_spec(spec, pieces)
        write = self.begin_save(tenant, session_id, spec, token_ids, has_bias=pieces.has_bias, **options)
        try:
            expected = (write.staged.start, write.staged.end)
            if (pieces.start, pieces.end) != expected:
                raise InvalidRequest(f"KV covers tokens [{pieces.start}, {pieces.end}) but the session needs [{expected[0]}, {expected[1]})")
            pieces.check_complete()
        except BaseException:
            write.abort()
            raise
        return self._feed(write, pieces)

    def _feed(self, write: OpenWrite, pieces: KVPieces) -> WriteResult:
        """Add every block of ``pieces`` (chunk by chunk, so memory stays bounded) and commit."""
        try:
            chunk, spec = self.config.chunk_tokens, pieces.spec
            first = pieces.start - pieces.start % chunk
            for block_start in range(first, pieces.end, chunk):
                lo, hi = max(block_start, pieces.start), min(block_start + chunk, pieces.end)
                for layer in range(spec.num_layers):
                    for token_start, keys, values, bias in pieces.views(layer, lo, hi - lo):  # no copy until the block record
                        write.staged.add_views(layer, token_start, keys, values, bias)
        except BaseException:
            write.abort()
            raise
        return write.commit()

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
        return RestorePlan(record, start, end, refs, len(refs) * record.spec.num_layers, lambda ref: self.load_chunk(record, ref))

    def load_chunk(self, record: SessionRecord, ref: BlockRef, layers: list[int] | None = None, cache: bool = True) -> list[Block]:
        """The blocks of one chunk of ``record`` (``layers``: only those), from the fastest tier;
        ``cache=False`` leaves the memory tiers as they are (scans: index builds, verification).

        A block missing while the record still refers to it is damage (CorruptData naming the
        session); missing because the session changed meanwhile is Conflict (retry)."""
        try:
            return self.blocks.get_chunk(ref.key, record.spec.num_layers, layers, cache)
        except MissingBlock as exc:
            if record.session_id:
                skey = session_key(record.tenant, record.session_id)
                with self.backend.read() as txn:
                    raw = txn.get("sessions", skey)
                    current = None if raw is None else decode_session(skey, raw)
                if current is None or current.is_expired(self._now_ms()):
                    raise NotFound(f"session {record.session_id!r} of tenant {record.tenant!r} was deleted while it was being read") from None
                changed = current.version != record.version or current.created_at_ms != record.created_at_ms
            else:  # a prefix restore: damage if the chunk is still referenced
                with self.backend.read() as txn:
                    changed = txn.get("refs", ref.key) is None
            if changed:
                raise Conflict(f"session {record.session_id or '(prefix)'!r} changed while it was being read; restore it again") from None
            raise CorruptData(
                f"session {record.session_id or '(prefix)'!r} of tenant {record.tenant!r}: {exc}; the store is damaged. "
                "Run `kvmem verify`; delete the session or restore it from a backup"
            ) from None

    def restore_prefix(self, tenant: str, spec: ModelSpec, token_ids: np.ndarray, start: int = 0, end: int = 0) -> RestorePlan:
        """Restore the longest stored prefix of token_ids (no session needed: blocks are content-addressed).

        ``[start, end)`` (end 0 = the whole match) narrows it to the tokens a caller lacks (a vLLM
        worker whose own prefix cache holds the first ones); the range is cut at the stored prefix,
        so the plan may end before ``end``; nothing stored at ``start`` is NotFound."""
        validate_id(tenant, "tenant", self.config.max_id_bytes)
        token_ids = token_ids_array(token_ids)
        if start < 0 or end < 0 or (end and start >= end):
            raise InvalidRequest(f"token range [{start}, {end}) is empty or negative; give 0 <= token_start < token_end (token_end 0 = to the end)")
        matched, keys = self._match_prefix(tenant, spec, token_ids)
        if matched == 0:
            raise NotFound("no stored prefix of these tokens for this tenant and model; prefill and save them first")
        if start >= matched:
            raise NotFound(f"only the first {matched} of these tokens are stored for this tenant and model, not token {start}; prefill the rest")
        chunk = self.config.chunk_tokens
        refs = [BlockRef(key, i * chunk, min(chunk, matched - i * chunk)) for i, key in enumerate(keys)]
        record = SessionRecord(tenant, "", spec, token_ids[:matched], refs, logical_length=matched)
        return self._plan(record, start, min(end, matched) if end else matched)

    # ----------------------------------------------------------------- lookup
    def lookup(self, tenant: str, spec: ModelSpec, token_ids: np.ndarray) -> int:
        """Number of leading token_ids whose KV is stored for this tenant and model."""
        validate_id(tenant, "tenant", self.config.max_id_bytes)
        return self._match_prefix(tenant, spec, token_ids_array(token_ids))[0]

    def _match_prefix(self, tenant: str, spec: ModelSpec, token_ids: np.ndarray) -> tuple[int, list[bytes]]:
        chunk, digest = self.config.chunk_tokens, spec.digest()
        matched, previous, keys = 0, ROOT_KEY, []
        with self.backend.read() as txn:
            while matched + chunk <= len(token_ids):
                key = chain_key(tenant, digest, previous, token_ids[matched : matched + chunk])
                if txn.get("refs", key) is None:
                    break
                keys.append(key)
                matched, previous = matched + chunk, key
            # a partial chunk is stored only where some session ends inside it: longest first
            for count in range(min(chunk - 1, len(token_ids) - matched), 0, -1):
                key = chain_key(tenant, digest, previous, token_ids[matched : matched + count])
                if txn.get("refs", key) is not None:
                    return matched + count, keys + [key]
        return matched, keys

    # ----------------------------------------------------------------- append
    def begin_append(
        self,
        tenant: str,
        session_id: str,
        spec: ModelSpec,
        new_token_ids: np.ndarray,
        *,
        expected_num_tokens: int | None = None,
        ttl_seconds: int = 0,
        text: str | None = None,
    ) -> OpenWrite:
        """Open an append of new tokens; their KV ([T_old, T_old + n)) is added to the returned
        OpenWrite, and ``commit()`` applies it atomically. ``text`` is appended to the session's
        stored text."""
        validate_ttl(ttl_seconds)
        text_data = text_bytes(text)
        record = self._read_record(tenant, session_id)
        if not isinstance(spec, ModelSpec):
            raise InvalidRequest(f"a model spec is required, got {type(spec).__name__}")
        record.spec.require_same(spec, f"session {session_id!r}")
        new_token_ids = token_ids_array(new_token_ids, "new token ids")
        old_total, added = record.num_tokens, len(new_token_ids)
        if added == 0:
            raise InvalidRequest("append needs at least one new token")
        self._check_size(old_total + added, spec)  # token counts stay far below 2^62 (max_session_tokens < 2^32)
        check_logical_bound(record.logical_length + added, f"the logical length after the append ({record.logical_length} + {added})")
        if expected_num_tokens is not None and expected_num_tokens != old_total:
            raise Conflict(f"session {session_id!r} holds {old_total} tokens, not the expected {expected_num_tokens}; restore it and retry")
        chunk = self.config.chunk_tokens
        tokens = np.concatenate([record.token_ids, new_token_ids])
        kept = list(record.blocks)
        replaced: list[BlockRef] = []
        prefill = None
        if record.chained and kept and kept[-1].count < chunk:
            replaced = [kept.pop()]  # the partial tail chunk is rebuilt with the new tokens
            prefill = {}
            for block in self.load_chunk(record, replaced[0]):
                prefill[block.layer] = block.raw_arrays()
        first = replaced[0].start if replaced else old_total
        ranges = chunk_ranges(first, len(tokens), chunk)
        if record.chained:
            previous = kept[-1].key if kept else ROOT_KEY
            keys = chain_keys(tenant, spec.digest(), tokens, chunk, previous=previous, start=first)
        else:
            keys = [private_key() for _ in ranges]
        new_refs = [BlockRef(k, s, c) for k, (s, c) in zip(keys, ranges)]
        positions = record.positions
        logical = record.logical_length + added
        if positions is not None:
            positions = np.concatenate([positions, np.arange(record.logical_length, logical, dtype=np.int64)])
        skey = session_key(tenant, session_id)

        def commit(staged: StagedWrite) -> WriteResult:
            now = self._now_ms()

            def apply(tx: CatalogTxn) -> WriteResult:
                current = tx.get_session(skey)
                if current is None or current.version != record.version or current.is_expired(now):
                    raise Conflict(f"session {session_id!r} changed or vanished during the append; restore it and retry")
                _, written = self._link_chunks(tx, tenant, new_refs, staged)
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

        return OpenWrite(self._staged_write(spec, old_total, len(tokens), record.has_bias, new_refs, prefill=prefill), commit)

    def append(self, tenant: str, session_id: str, spec: ModelSpec, new_token_ids: np.ndarray, pieces: KVPieces, **options) -> WriteResult:
        """Add the KV of new tokens from process memory; ``pieces`` covers [T_old, T_old + n).
        Atomic; ``options`` are those of ``begin_append``."""
        write = self.begin_append(tenant, session_id, spec, new_token_ids, **options)
        try:
            self._check_pieces_spec(spec, pieces)
        except BaseException:
            write.abort()
            raise
        expected = (write.staged.start, write.staged.end)
        if (pieces.start, pieces.end) != expected:
            write.abort()
            raise InvalidRequest(f"KV covers tokens [{pieces.start}, {pieces.end}) but the new tokens are [{expected[0]}, {expected[1]})")
        if pieces.has_bias != write.staged.has_bias:
            write.abort()
            raise InvalidRequest(f"session has_bias={write.staged.has_bias} but the appended KV has_bias={pieces.has_bias}")
        try:
            pieces.check_complete()
        except BaseException:
            write.abort()
            raise
        return self._feed(write, pieces)

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
            for block in self.load_chunk(source, boundary):
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

        def apply(tx: CatalogTxn) -> WriteResult:
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
        key = aux_key(skey, name)
        with self.backend.read() as txn:
            raw = txn.get("aux", key)
            return None if raw is None else decode_aux(key, raw)

    def put_aux(self, tenant: str, session_id: str, records: dict[str, bytes], derived_from: SessionRecord) -> None:
        """Attach ``records`` (name -> payload) to the session in one transaction, each tagged
        with the generation it was derived from.

        Raises Conflict when the session changed (or vanished) since ``derived_from`` was read:
        a derived index of an older generation is never stored as current.
        """
        skey = session_key(tenant, session_id)

        def apply(tx: CatalogTxn) -> int:
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

        def apply(tx: CatalogTxn) -> int:
            record, damaged = catalog.get_session_or_damage(tx.txn, skey)
            if record is None and not damaged:
                raise NotFound(f"session {session_id!r} of tenant {tenant!r} does not exist")
            return tx.delete_session(tenant, skey, record)  # a damaged record goes too (its blocks stay until salvage)

        return self._write(apply)

    def list(self, tenant: str, page_size: int = 100, page_token: str = "") -> tuple[list[SessionRecord | catalog.DamagedSession], str]:
        """Sessions of a tenant in id order; returns (page, next_page_token or "").

        A record that fails its check is listed as a DamagedSession; a catalogue that does not
        match the tenant's count and digest raises CorruptData (never a shorter list)."""
        validate_id(tenant, "tenant", self.config.max_id_bytes)
        page_size = min(max(page_size or 100, 1), 1000)
        prefix = tenant_prefix(tenant)
        try:
            start = base64.urlsafe_b64decode(page_token.encode()) if page_token else prefix
        except ValueError:
            raise InvalidRequest("page_token is not one this server issued; start again with an empty token") from None
        if not start.startswith(prefix):
            raise InvalidRequest("page_token belongs to another tenant or is malformed; start again with an empty token")
        now, page, next_token = self._now_ms(), [], ""
        with self.backend.read() as txn:
            problem = catalog.check_tenant(txn, tenant)
            if problem is not None:
                raise CorruptData(f"cannot list tenant {tenant!r}: {problem}")
            for key, raw in txn.scan("sessions", start=start, prefix=prefix):
                if len(page) == page_size:
                    next_token = base64.urlsafe_b64encode(key).decode()
                    break
                entry = catalog.decode_or_damage(key, raw)
                if isinstance(entry, catalog.DamagedSession) or not entry.is_expired(now):
                    page.append(entry)
        return page, next_token

    def collect_expired(self) -> int:
        """Delete every session whose TTL has passed; returns how many."""
        now = self._now_ms()
        bound = struct.pack(">Q", now + 1)

        def apply(tx: CatalogTxn) -> int:
            due = []
            for key, _ in tx.txn.scan("ttl", values=False):
                if key[:8] >= bound:
                    break
                due.append(key)
            removed = 0
            for index_key in due:
                skey = index_key[8:]
                record, _ = catalog.get_session_or_damage(tx.txn, skey)
                if record is not None and record.is_expired(now):
                    tx.delete_session(record.tenant, skey, record)
                    removed += 1
                else:  # stale index entry: the session was refreshed or replaced
                    tx.txn.delete("ttl", index_key)
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
            return read_usage(txn, tenant)[0]

    def usage_by_tenant(self, limit: int = 10_000) -> list[TenantUsage]:
        """Every tenant's usage (at most ``limit`` tenants, in tenant order), for metrics."""
        found = []
        with self.backend.read() as txn:
            for key, raw in txn.scan("usage"):
                if len(found) >= limit:
                    break
                tenant = key.decode("utf-8", "replace")
                try:
                    found.append(parse_usage_row(tenant, raw)[0])
                except CorruptData:
                    log.error("usage row unreadable", extra={"fields": {"tenant": tenant}})
        return found

    def stats(self) -> dict:
        with self.backend.read() as txn:
            counters = read_counters(txn)
        tiers = [
            {"name": tier.name, "bytes_used": tier.bytes_used(), "capacity_bytes": tier.capacity(), "entries": len(tier), **vars(tier.counters)}
            for tier in self.blocks.tiers
        ]
        lmdb_counters = self.blocks.lmdb_counters
        used = self.backend.used_bytes()
        tiers.append({
            "name": self.backend.name, "bytes_used": used, "capacity_bytes": self.backend.capacity_bytes(),
            "entries": counters["chunks"], **vars(lmdb_counters),
        })
        return {
            **counters,
            "tiers": tiers,
            "lmdb_map_bytes": self.backend.map_bytes,
            "lmdb_used_bytes": used,
            "chunk_tokens": self.config.chunk_tokens,
            "inflight_bytes": self.budget.used,
            "group_commits": self.backend.commits,
            "group_commit_writes": self.backend.batched,
            "damaged_tenants": len(self.damaged_tenants),
        }

    # ----------------------------------------------------------------- salvage
    def import_session(self, record: SessionRecord, chunks: list[tuple[bytes, list[Block]]], text: bytes | None = None) -> None:
        """Store a session read (and verified) from another store: its blocks as they are
        (checksums are bound to their keys, which do not change) and its record."""
        skey = session_key(record.tenant, record.session_id)

        def apply(tx: CatalogTxn) -> int:
            previous, damaged = catalog.get_session_or_damage(tx.txn, skey)
            if previous is not None or damaged:
                raise AlreadyExists(f"session {record.session_id!r} of tenant {record.tenant!r} is already in the destination")
            for key, blocks in chunks:
                if not tx.incref(key):
                    tx.put_chunk(record.tenant, key, blocks)
            tx.put_session(record.tenant, skey, record, None)
            if text:
                tx.put_aux(skey, TEXT_AUX, record, text)
            return 0

        self._write(apply)
