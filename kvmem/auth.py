"""Who is calling: API keys (bearer tokens) and client certificates -> an Identity.

The keys file is TOML and holds SHA-256 digests of tokens, never tokens::

    [keys.k3f9a1c2e]
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    tenant = "acme"
    role = "tenant"            # or "admin": may act for any tenant, sees totals
    max_stored_bytes = 10000000000   # optional quota overrides (0 = unlimited)
    max_sessions = 1000

    [certs."worker-1.acme.internal"]   # optional: client-certificate common name -> tenant
    tenant = "acme"
    role = "tenant"

A presented token is hashed and looked up by its digest, then compared with
``hmac.compare_digest``: the lookup's timing depends only on the SHA-256 of the token, which
reveals nothing about the token itself. The file reloads on SIGHUP (``KeyRing.reload``): the new
set replaces the old in one reference swap, so calls in flight keep the identity they started
with and no call is dropped. A file that fails to parse keeps the old set and logs why.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("kvmem.auth")
ROLES = ("tenant", "admin")
TOKEN_PREFIX = "kvmem_"


class KeysFileError(ValueError):
    """A keys file that cannot be used (syntax, unknown fields, bad values)."""


@dataclass(frozen=True)
class Identity:
    """The authenticated caller. key_id names the key (or "cert:<common name>"), never the token."""

    tenant: str
    key_id: str
    role: str = "tenant"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    sha256: str  # hex digest of the token
    tenant: str
    role: str = "tenant"
    max_stored_bytes: int | None = None  # None: the server's [quota] default
    max_sessions: int | None = None
    created_at: str = ""

    @property
    def identity(self) -> Identity:
        return Identity(self.tenant, self.key_id, self.role)


@dataclass(frozen=True)
class KeySet:
    """One immutable generation of the keys file."""

    by_digest: Mapping[bytes, KeyEntry] = field(default_factory=dict)
    certs: Mapping[str, Identity] = field(default_factory=dict)

    def quota_overrides(self, tenant: str) -> dict[str, int]:
        """Quota overrides of the tenant's keys: the most generous per quota (0 = unlimited wins)."""
        found: dict[str, int] = {}
        for entry in self.by_digest.values():
            if entry.tenant != tenant:
                continue
            for name in ("max_stored_bytes", "max_sessions"):
                value = getattr(entry, name)
                if value is None:
                    continue
                found[name] = 0 if value == 0 or found.get(name) == 0 else max(found.get(name, value), value)
        return found


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _int_or_none(raw: Mapping, name: str, where: str) -> int | None:
    if name not in raw:
        return None
    value = raw[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise KeysFileError(f"{where}: {name} must be a non-negative integer, got {value!r}")
    return value


def _role(raw: Mapping, where: str) -> str:
    role = raw.get("role", "tenant")
    if role not in ROLES:
        raise KeysFileError(f"{where}: role must be one of {ROLES}, got {role!r}")
    return role


def _tenant(raw: Mapping, where: str) -> str:
    from kvstore.validation import validate_id

    tenant = raw.get("tenant")
    if not isinstance(tenant, str):
        raise KeysFileError(f"{where}: tenant (a string) is required")
    try:
        validate_id(tenant, "tenant", 256)
    except Exception as exc:  # noqa: BLE001 - InvalidRequest from the id rules
        raise KeysFileError(f"{where}: {exc}") from None
    return tenant


KEY_FIELDS = {"sha256", "tenant", "role", "max_stored_bytes", "max_sessions", "created_at"}
CERT_FIELDS = {"tenant", "role"}


def parse_keys(text: str, source: str = "keys file") -> tuple[list[KeyEntry], KeySet]:
    """Entries in file order and the lookup set; raises KeysFileError naming the problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{source}: {exc}") from None
    unknown = set(raw) - {"keys", "certs"}
    if unknown:
        raise KeysFileError(f"{source}: unknown tables {sorted(unknown)}; use [keys.<id>] and [certs.<common name>]")
    entries: list[KeyEntry] = []
    by_digest: dict[bytes, KeyEntry] = {}
    for key_id, item in raw.get("keys", {}).items():
        where = f"{source}: [keys.{key_id}]"
        if not isinstance(item, dict):
            raise KeysFileError(f"{where} must be a table")
        if set(item) - KEY_FIELDS:
            raise KeysFileError(f"{where}: unknown fields {sorted(set(item) - KEY_FIELDS)}; known: {sorted(KEY_FIELDS)}")
        digest = item.get("sha256", "")
        try:
            digest_bytes = bytes.fromhex(digest) if isinstance(digest, str) else b""
        except ValueError:
            digest_bytes = b""
        if len(digest_bytes) != 32:
            raise KeysFileError(f"{where}: sha256 must be the 64-hex-digit SHA-256 of the token")
        entry = KeyEntry(
            key_id, digest.lower(), _tenant(item, where), _role(item, where),
            _int_or_none(item, "max_stored_bytes", where), _int_or_none(item, "max_sessions", where), str(item.get("created_at", "")),
        )
        if digest_bytes in by_digest:
            raise KeysFileError(f"{where}: the same token digest is listed twice ({by_digest[digest_bytes].key_id})")
        by_digest[digest_bytes] = entry
        entries.append(entry)
    certs: dict[str, Identity] = {}
    for name, item in raw.get("certs", {}).items():
        where = f"{source}: [certs.{json.dumps(name)}]"
        if not isinstance(item, dict) or set(item) - CERT_FIELDS:
            raise KeysFileError(f"{where}: a table with fields {sorted(CERT_FIELDS)}")
        certs[name] = Identity(_tenant(item, where), f"cert:{name}", _role(item, where))
    return entries, KeySet(by_digest, certs)


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=True)  # a JSON string with ASCII escapes is a TOML basic string


def render_keys(entries: list[KeyEntry], certs: Mapping[str, Identity] | None = None) -> str:
    lines = ["# kvmem API keys: SHA-256 digests of bearer tokens, never the tokens.", "# Edit with `kvmem keys add` / `kvmem keys rm`; the server reloads it on SIGHUP.", ""]
    for entry in entries:
        lines.append(f"[keys.{_toml_string(entry.key_id)}]")
        lines.append(f"sha256 = {_toml_string(entry.sha256)}")
        lines.append(f"tenant = {_toml_string(entry.tenant)}")
        lines.append(f"role = {_toml_string(entry.role)}")
        for name in ("max_stored_bytes", "max_sessions"):
            if getattr(entry, name) is not None:
                lines.append(f"{name} = {getattr(entry, name)}")
        if entry.created_at:
            lines.append(f"created_at = {_toml_string(entry.created_at)}")
        lines.append("")
    for name, identity in (certs or {}).items():
        lines += [f"[certs.{_toml_string(name)}]", f"tenant = {_toml_string(identity.tenant)}", f"role = {_toml_string(identity.role)}", ""]
    return "\n".join(lines)


def _write_private(path: Path, text: str) -> None:
    """Atomic replace, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_keys(path: Path) -> tuple[list[KeyEntry], KeySet]:
    """The keys file's entries and lookup set; a file not written yet holds no keys."""
    return parse_keys(path.read_text(), str(path)) if path.exists() else ([], KeySet())


def add_key(path: Path, tenant: str, role: str = "tenant", max_stored_bytes: int | None = None, max_sessions: int | None = None) -> tuple[KeyEntry, str]:
    """Add a new random key for ``tenant``; returns (entry, token). The token is not stored."""
    path = Path(path)
    entries, keyset = read_keys(path)
    if role not in ROLES:
        raise KeysFileError(f"role must be one of {ROLES}, got {role!r}")
    _tenant({"tenant": tenant}, "--tenant")
    token = new_token()
    known = {e.key_id for e in entries}
    key_id = "k" + secrets.token_hex(4)
    while key_id in known:
        key_id = "k" + secrets.token_hex(4)
    entry = KeyEntry(key_id, token_digest(token).hex(), tenant, role, max_stored_bytes, max_sessions, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_private(path, render_keys([*entries, entry], keyset.certs))
    return entry, token


def remove_key(path: Path, key_id: str) -> KeyEntry:
    """Remove one key by id; raises KeysFileError if it is not there."""
    path = Path(path)
    entries, keyset = read_keys(path)
    doomed = [e for e in entries if e.key_id == key_id]
    if not doomed:
        raise KeysFileError(f"{path}: no key {key_id!r}; `kvmem keys ls` lists them")
    _write_private(path, render_keys([e for e in entries if e.key_id != key_id], keyset.certs))
    return doomed[0]


def list_keys(path: Path) -> list[KeyEntry]:
    path = Path(path)
    return read_keys(path)[0]


class KeyRing:
    """The server's current key set, loaded from a file and reloaded on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._keys = self._load()  # replaced whole by reload(); readers never lock

    def _load(self) -> KeySet:
        if not self.path.exists():
            raise KeysFileError(f"auth.keys_file {self.path} does not exist; create a key with `kvmem keys add --keys-file {self.path} --tenant NAME`")
        return parse_keys(self.path.read_text(), str(self.path))[1]

    def reload(self) -> bool:
        """Re-read the file; on any error keep the current keys. True if the new set is in use."""
        try:
            keys = self._load()
        except (OSError, KeysFileError) as exc:
            log.error("keys file not reloaded; the previous keys stay in use", extra={"fields": {"path": str(self.path), "error": str(exc)}})
            return False
        self._keys = keys
        log.info("keys file reloaded", extra={"fields": {"path": str(self.path), "keys": len(keys.by_digest), "certs": len(keys.certs)}})
        return True

    @property
    def keys(self) -> KeySet:
        return self._keys

    def identify_token(self, token: str) -> Identity | None:
        digest = token_digest(token)
        entry = self._keys.by_digest.get(digest)
        if entry is None or not hmac.compare_digest(bytes.fromhex(entry.sha256), digest):
            return None
        return entry.identity

    def identify_certificate(self, common_name: str) -> Identity:
        """A verified client certificate: its mapped identity, else its common name as tenant."""
        return self._keys.certs.get(common_name) or Identity(common_name, f"cert:{common_name}", "tenant")


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None
