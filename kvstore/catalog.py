"""The session catalogue check: tells a damaged catalogue from a short one.

LMDB's B-tree pages carry no checksums: one damaged page can drop session keys from a scan
without any error. Each tenant's usage row keeps how many sessions it holds and the XOR of a
hash of every session key (``kvstore.txn``), updated in the same transaction as the sessions.
A scan that disagrees is damage, reported as such (DATA_LOSS naming the tenant), never a
shorter list answered OK. A single record that fails its own checksum is listed as a
``DamagedSession`` beside the healthy ones instead of failing the tenant.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from kvstore.backend import Backend, ReadTxn
from kvstore.codec import SESSION_HEADER_BYTES as _SESSION_HEADER_BYTES, decode_session
from kvstore.errors import CorruptData
from kvstore.keys import catalog_digest, session_key, split_session_key, tenant_prefix
from kvstore.records import SessionRecord
from kvstore.txn import parse_usage_row, read_usage

_ADVICE = "run `kvmem verify` to see what is damaged and `kvmem salvage` to copy out what is readable"


@dataclass(frozen=True)
class DamagedSession:
    """A session key whose record fails its integrity check."""

    tenant: str
    session_id: str
    key: bytes
    damage: str
    record: SessionRecord | None = None  # the intact record, when only its key is damaged (salvage copies it)


def decode_or_damage(key: bytes, raw) -> SessionRecord | DamagedSession:
    try:
        return decode_session(key, raw)
    except (CorruptData, ValueError, KeyError, TypeError) as exc:  # a damaged record may not even parse
        moved = _intact_under_damaged_key(key, raw)
        if moved is not None:
            return moved
        tenant, session_id = split_session_key(key)
        return DamagedSession(tenant, session_id, key, str(exc) if isinstance(exc, CorruptData) else f"session record {key!r} is unreadable ({exc})")


def _intact_under_damaged_key(key: bytes, raw) -> DamagedSession | None:
    """A record whose checksum holds for the ids it names is intact and its *key* is damaged:
    it is listed under its own (checked) id, so the damaged entry names the right session."""
    try:
        claimed = json.loads(bytes(raw)[_SESSION_HEADER_BYTES : _SESSION_HEADER_BYTES + struct.unpack_from("<I", raw, 8)[0]])
        tenant, session_id = claimed["tenant"], claimed["session_id"]
        real_key = session_key(tenant, session_id)
        if real_key == key:
            return None
        record = decode_session(real_key, raw)
    except (CorruptData, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
        return None
    return DamagedSession(tenant, session_id, key, f"the record of session {session_id!r} is intact but stored under a damaged key {key!r}; "
                          "run `kvmem salvage` (it copies such a session under its own key)", record)


def get_session_or_damage(txn: ReadTxn, skey: bytes) -> tuple[SessionRecord | None, bool]:
    """(record, damaged): (None, False) when absent, (None, True) when its record is damaged."""
    raw = txn.get("sessions", skey)
    if raw is None:
        return None, False
    entry = decode_or_damage(skey, raw)
    return (None, True) if isinstance(entry, DamagedSession) else (entry, False)


def check_tenant(txn: ReadTxn, tenant: str, strict: bool = False) -> str | None:
    """What is wrong with ``tenant``'s catalogue, or None when it is whole.

    A digest that differs only because some records are damaged (listed as such) passes,
    unless ``strict``: a session that is not found where damaged keys exist may be one of them."""
    try:
        usage, digest = read_usage(txn, tenant)
    except CorruptData as exc:
        return f"{exc}; {_ADVICE}"
    count = found = 0
    prefix = tenant_prefix(tenant)
    for key, _ in txn.scan("sessions", prefix=prefix, values=False):
        count += 1
        found ^= catalog_digest(key)
    return _compare(txn, tenant, usage.sessions, digest, count, found, strict)


def _compare(txn: ReadTxn, tenant: str, recorded: int, digest: int, count: int, found: int, strict: bool = False) -> str | None:
    if count != recorded:
        return (f"the session catalogue of tenant {tenant!r} is damaged: {recorded} sessions are recorded but {count} were found; "
                f"sessions may be missing from lists and restores. {_ADVICE}")
    if found != digest and strict:
        return f"tenant {tenant!r} has damaged session records (their ids may be damaged too). {_ADVICE}"
    if found != digest and not _has_damaged_record(txn, tenant):
        return f"the session catalogue of tenant {tenant!r} is damaged: the session ids found do not match the recorded ones. {_ADVICE}"
    return None


def _has_damaged_record(txn: ReadTxn, tenant: str) -> bool:
    """True if some record of ``tenant`` fails its check (a damaged key changes the digest too;
    such a record is listed as damaged, so the difference is not silent)."""
    return any(isinstance(decode_or_damage(key, raw), DamagedSession) for key, raw in txn.scan("sessions", prefix=tenant_prefix(tenant)))


def check_all(backend: Backend) -> dict[str, str]:
    """Every tenant whose catalogue does not match its usage row -> what is wrong."""
    problems: dict[str, str] = {}
    try:
        with backend.read() as txn:
            seen: dict[str, list[int]] = {}
            for key, _ in txn.scan("sessions", values=False):
                tenant = split_session_key(key)[0]
                entry = seen.setdefault(tenant, [0, 0])
                entry[0] += 1
                entry[1] ^= catalog_digest(key)
            recorded: dict[str, tuple[int, int]] = {}
            for key, raw in txn.scan("usage"):
                tenant = key.decode("utf-8", "replace")
                try:
                    usage, digest = parse_usage_row(tenant, raw)
                except CorruptData as exc:
                    problems[tenant] = str(exc)
                    continue
                recorded[tenant] = (usage.sessions, digest)
            for tenant in set(seen) | set(recorded):
                if tenant in problems:
                    continue
                count, found = seen.get(tenant, (0, 0))
                sessions, digest = recorded.get(tenant, (0, 0))
                problem = _compare(txn, tenant, sessions, digest, count, found)
                if problem is not None:
                    problems[tenant] = problem
    except CorruptData as exc:
        problems["*"] = str(exc)
    return problems
