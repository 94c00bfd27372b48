"""Keys of the records the store keeps in its backend spaces (see ``kvstore.backend``)."""
from __future__ import annotations

import hashlib
import struct

from kvstore.errors import InvalidRequest

# LMDB keys are at most 511 bytes; the longest derived key is an aux key (session key + 1 +
# name), so session keys stay within MAX_SESSION_KEY_BYTES and aux names within MAX_AUX_NAME_BYTES.
MAX_SESSION_KEY_BYTES = 440
MAX_AUX_NAME_BYTES = 64
_KEY_DIGEST_BYTES = 16
OWNER_BYTES = 16  # id of one open write stream, in ``staged`` keys


def session_key(tenant: str, session_id: str) -> bytes:
    """Key of a session: ``tenant \\0 session_id``, sorted by tenant then id.

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


def tenant_prefix(tenant: str) -> bytes:
    """Every session key of ``tenant`` starts with this."""
    return tenant.encode() + b"\x00"


def split_session_key(skey: bytes) -> tuple[str, str]:
    """(tenant, id) a session key names, readable even when its bytes are damaged."""
    tenant, _, rest = skey.partition(b"\x00")
    return tenant.decode("utf-8", "replace"), rest.split(b"\x00", 1)[0].decode("utf-8", "replace")


def aux_key(skey: bytes, name: str) -> bytes:
    """Key of a session's aux record: its text ("text") or a derived index ("index/...")."""
    encoded = name.encode()
    if len(encoded) > MAX_AUX_NAME_BYTES:
        raise InvalidRequest(f"aux record name {name[:40]!r}... is {len(encoded)} bytes; the limit is {MAX_AUX_NAME_BYTES}")
    return skey + b"\x01" + encoded


def ttl_key(expires_at_ms: int, skey: bytes) -> bytes:
    return struct.pack(">Q", expires_at_ms) + skey


def staged_key(chunk_key: bytes, owner: bytes) -> bytes:
    """Marks a chunk whose blocks the write stream ``owner`` is writing (not yet committed)."""
    return chunk_key + owner


def catalog_digest(skey: bytes) -> int:
    """One session key's share of its tenant's catalogue digest (the XOR over all its keys)."""
    return int.from_bytes(hashlib.blake2b(skey, digest_size=8, person=b"kvmem-cat").digest(), "little")
