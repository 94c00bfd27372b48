"""Finding damage: a full ``verify`` of a store, a rate-limited background ``Scrubber`` over
every block, and ``salvage``, which copies every readable, checksum-valid session into a new
store."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kvstore import catalog
from kvstore.chunking import KEY_BYTES, block_storage_key
from kvstore.codec import decode_aux, decode_block
from kvstore.errors import CorruptData
from kvstore.keys import aux_key, session_key, split_session_key
from kvstore.records import SessionRecord
from kvstore.txn import REF

log = logging.getLogger("kvmem.scrub")


@dataclass
class VerifyReport:
    sessions: int = 0
    blocks_checked: int = 0
    bytes_checked: int = 0
    damaged_sessions: list[dict] = field(default_factory=list)  # {tenant, session_id, damage}
    damaged_blocks: list[dict] = field(default_factory=list)  # {block, damage}
    refcount_mismatches: list[dict] = field(default_factory=list)
    orphan_chunks: int = 0  # chunks with a reference count but no session
    unreferenced_blocks: int = 0  # blocks of no referenced chunk (staged by unfinished writes, or leaked)
    staged_entries: int = 0  # unfinished writes (removed by the sweep)
    catalogue: dict[str, str] = field(default_factory=dict)  # tenant -> problem
    errors: list[str] = field(default_factory=list)  # scans LMDB could not finish

    @property
    def ok(self) -> bool:
        return not (self.damaged_sessions or self.damaged_blocks or self.refcount_mismatches or self.catalogue or self.errors)

    def as_dict(self) -> dict:
        return {**vars(self), "ok": self.ok}


def _check_chunk(txn, record: SessionRecord, ref, report: VerifyReport | None) -> str | None:
    """What is wrong with one chunk of ``record`` (None: every layer present and valid)."""
    spec = record.spec
    for layer in range(spec.num_layers):
        key = block_storage_key(ref.key, layer)
        raw = txn.get("blocks", key)
        if raw is None:
            return f"block {ref.key.hex()} layer {layer} is missing"
        try:
            block = decode_block(key, raw)
        except CorruptData as exc:
            return str(exc)
        if report is not None:
            report.blocks_checked += 1
            report.bytes_checked += block.nbytes
        if (block.layer, block.num_tokens, block.num_heads, block.head_dim, block.has_bias) != (layer, ref.count, spec.num_kv_heads, spec.head_dim, record.has_bias):
            return f"block {ref.key.hex()} layer {layer} does not have the shape the session records"
    return None


def verify(store) -> VerifyReport:
    """Check every session record, every block a session refers to, reference counts and each
    tenant's catalogue. Reads in one snapshot; safe while the server writes."""
    report = VerifyReport(catalogue=catalog.check_all(store.backend))
    if getattr(store.backend, "meta_problem", None):
        report.errors.append(f"the LMDB meta pages are damaged: {store.backend.meta_problem}")
    expected: dict[bytes, int] = {}
    checked: dict[bytes, str | None] = {}
    try:
        with store.backend.read() as txn:
            for key, raw in txn.scan("sessions"):
                report.sessions += 1
                entry = catalog.decode_or_damage(key, raw)
                if isinstance(entry, catalog.DamagedSession):
                    report.damaged_sessions.append({"tenant": entry.tenant, "session_id": entry.session_id, "damage": entry.damage})
                    continue
                problems = []
                for ref in entry.blocks:
                    expected[ref.key] = expected.get(ref.key, 0) + 1
                    if ref.key not in checked:
                        checked[ref.key] = _check_chunk(txn, entry, ref, report)
                        if checked[ref.key] is not None:
                            report.damaged_blocks.append({"block": ref.key.hex(), "damage": checked[ref.key]})
                    if checked[ref.key] is not None:
                        problems.append(checked[ref.key])
                if problems:
                    report.damaged_sessions.append({"tenant": entry.tenant, "session_id": entry.session_id, "damage": problems[0]})
            for key, raw in txn.scan("refs"):
                count = REF.unpack(raw)[0] if len(raw) == REF.size else -1
                if key not in expected:
                    report.orphan_chunks += 1
                elif count != expected[key]:
                    report.refcount_mismatches.append({"chunk": key.hex(), "recorded": count, "sessions": expected[key]})
            for key in expected:
                if txn.get("refs", key) is None:
                    report.refcount_mismatches.append({"chunk": key.hex(), "recorded": 0, "sessions": expected[key]})
            report.staged_entries = txn.count("staged")
            report.unreferenced_blocks = sum(1 for key, _ in txn.scan("blocks", values=False) if txn.get("refs", key[:KEY_BYTES]) is None)
    except CorruptData as exc:
        report.errors.append(str(exc))
    return report


class Scrubber:
    """Reads every stored block in turn at ``bytes_per_second`` and checks its checksum; damage is
    logged (and counted in ``damaged``) so it is found before a restore needs the block."""

    def __init__(self, store, bytes_per_second: int):
        self.store = store
        self.rate = bytes_per_second
        self._position = b""
        self.checked = 0
        self.damaged = 0
        self.passes = 0

    def run_for(self, seconds: float) -> int:
        """Check up to ``rate * seconds`` bytes, continuing where the last call stopped."""
        budget = int(self.rate * seconds)
        done = 0
        with self.store.backend.read() as txn:
            last = None
            for key, raw in txn.scan("blocks", start=self._position):
                if key == self._position:
                    continue
                last = key
                done += len(raw)
                self.checked += 1
                try:
                    decode_block(key, raw)
                except CorruptData as exc:
                    self.damaged += 1
                    log.error("scrub found a damaged block", extra={"fields": {"block": key.hex(), "error": str(exc)}})
                if done >= budget:
                    break
            if last is None or done < budget:
                self._position = b""  # wrapped around
                self.passes += 1
            else:
                self._position = last
        return done


@dataclass
class SalvageReport:
    copied: list[str] = field(default_factory=list)  # "tenant/session"
    skipped: list[dict] = field(default_factory=list)  # {tenant, session_id, reason}
    errors: list[str] = field(default_factory=list)


def salvage(source, destination) -> SalvageReport:
    """Copy every session of ``source`` (a store, open read-only) whose record and blocks are
    all readable and pass their checksums into ``destination`` (an open, writable store)."""
    report = SalvageReport()
    try:
        with source.backend.read() as txn:
            keys = [key for key, _ in txn.scan("sessions", values=False)]
    except CorruptData as exc:
        report.errors.append(f"the session list could not be read to the end: {exc}")
        keys = []
    for key in keys:
        try:
            _salvage_one(source, destination, key, report)
        except CorruptData as exc:
            tenant, session_id = split_session_key(key)
            report.skipped.append({"tenant": tenant, "session_id": session_id, "reason": str(exc)})
    return report


def _salvage_one(source, destination, key: bytes, report: SalvageReport) -> None:
    from kvstore.store import TEXT_AUX

    with source.backend.read() as txn:
        raw = txn.get("sessions", key)
        entry = catalog.decode_or_damage(key, raw) if raw is not None else None
        if isinstance(entry, catalog.DamagedSession) and entry.record is not None:
            key, entry = session_key(entry.tenant, entry.session_id), entry.record  # only its key was damaged
        if not isinstance(entry, SessionRecord):
            tenant, session_id = (entry.tenant, entry.session_id) if entry is not None else ("?", key.decode("utf-8", "replace"))
            report.skipped.append({"tenant": tenant, "session_id": session_id, "reason": entry.damage if entry else "record vanished"})
            return
        chunks = []
        for ref in entry.blocks:
            problem = _check_chunk(txn, entry, ref, None)
            if problem is not None:
                report.skipped.append({"tenant": entry.tenant, "session_id": entry.session_id, "reason": problem})
                return
            chunks.append((ref.key, [decode_block(block_storage_key(ref.key, layer), txn.get("blocks", block_storage_key(ref.key, layer))) for layer in range(entry.spec.num_layers)]))
        text_key = aux_key(key, TEXT_AUX)
        text_raw = txn.get("aux", text_key)
        text = None
        if text_raw is not None:
            try:
                text = decode_aux(text_key, text_raw).payload
            except CorruptData:
                text = None
    destination.import_session(entry, chunks, text)
    report.copied.append(f"{entry.tenant}/{entry.session_id}")

