"""Bytes <-> tensors and records, with integrity checks bound to the storage key.

Block record layout (little-endian, never pickle, never torch.save)::

    header  36 bytes: magic "KVB1", version, dtype code, flags, layer, H, D, n, checksum
    keys    H*n*D elements
    values  H*n*D elements
    bias    H*n float32 (only when flags has BIAS)

The checksum is xxh3-128 over (storage key, header without checksum, payload): a record copied to
another key, a header claiming another dtype or shape, or one flipped payload byte all fail it.
Session records carry a blake2b checksum over (key, content) the same way.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvstore.errors import CorruptData, InvalidRequest
from kvstore.records import BlockRef, SessionRecord
from kvstore.spec import CODE_DTYPES, DTYPE_CODES, ModelSpec

BLOCK_MAGIC = b"KVB1"
BLOCK_VERSION = 1
FLAG_BIAS = 1
_BLOCK_HEADER = struct.Struct("<4sBBBxHHHxxI16s")  # magic ver dtype flags | layer H D | n | checksum
BLOCK_HEADER_BYTES = _BLOCK_HEADER.size
_CHECKSUM_OFFSET = BLOCK_HEADER_BYTES - 16

SESSION_MAGIC = b"KVS1"
SESSION_VERSION = 1
_SESSION_HEADER = struct.Struct("<4sBxxxIIII16s")  # magic ver | meta_len n_tokens n_positions n_blocks | checksum
_BLOCK_REF = struct.Struct("<16sQI")
SESSION_HEADER_BYTES = _SESSION_HEADER.size  # meta_len is the u32 at offset 8

# Raw-bit views: copying KV never needs float semantics, and numpy has no bfloat16.
RAW_DTYPES: dict[int, np.dtype] = {1: np.dtype("<u4"), 2: np.dtype("<u2"), 3: np.dtype("<u2")}


def require_little_endian() -> None:
    """kvmem stores raw little-endian bytes; refuse to run where that would be wrong."""
    if sys.byteorder != "little":
        raise RuntimeError("kvmem requires a little-endian host")


def element_size(dtype_code: int) -> int:
    return RAW_DTYPES[dtype_code].itemsize


@dataclass(frozen=True)
class Block:
    """One stored (chunk, layer): keys and values [H, n, D], optional bias [H, n].

    data holds the whole encoded record (header + payload); the views below slice it without
    copying.
    """

    key: bytes
    layer: int
    num_heads: int
    num_tokens: int
    head_dim: int
    dtype_code: int
    has_bias: bool
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def kv_elements(self) -> int:
        return self.num_heads * self.num_tokens * self.head_dim

    def _span(self, index: int) -> memoryview:
        size = self.kv_elements * element_size(self.dtype_code)
        start = BLOCK_HEADER_BYTES + index * size
        return memoryview(self.data)[start : start + size]

    def keys_bytes(self) -> memoryview:
        return self._span(0)

    def values_bytes(self) -> memoryview:
        return self._span(1)

    def bias_bytes(self) -> memoryview:
        if not self.has_bias:
            return memoryview(b"")
        start = BLOCK_HEADER_BYTES + 2 * self.kv_elements * element_size(self.dtype_code)
        return memoryview(self.data)[start : start + 4 * self.num_heads * self.num_tokens]

    def raw_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Read-only raw-bit views: keys, values [H, n, D]; bias float32 [H, n] or None."""
        shape = (self.num_heads, self.num_tokens, self.head_dim)
        raw = RAW_DTYPES[self.dtype_code]
        keys = np.frombuffer(self.keys_bytes(), dtype=raw).reshape(shape)
        values = np.frombuffer(self.values_bytes(), dtype=raw).reshape(shape)
        bias = None
        if self.has_bias:
            bias = np.frombuffer(self.bias_bytes(), dtype="<f4").reshape(shape[:2])
        return keys, values, bias

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Copies: keys, values [H, n, D] in the stored dtype; bias float32 [H, n] or None."""
        keys, values, bias = self.raw_arrays()
        dtype = CODE_DTYPES[self.dtype_code]
        k = torch.from_numpy(keys.copy()).view(dtype)
        v = torch.from_numpy(values.copy()).view(dtype)
        b = torch.from_numpy(bias.copy()) if bias is not None else None
        return k, v, b


def _block_checksum(key: bytes, header_prefix: bytes, payload: list) -> bytes:
    digest = xxhash.xxh3_128()
    digest.update(key)
    digest.update(header_prefix)
    for part in payload:
        digest.update(part)
    return digest.digest()


def encode_block(
    key: bytes,
    layer: int,
    shape: tuple[int, int, int],
    dtype_code: int,
    keys: bytes | memoryview,
    values: bytes | memoryview,
    bias: bytes | memoryview | None = None,
) -> Block:
    """Build a checksummed block record. ``shape`` is (H, n, D); payloads are raw bytes."""
    heads, tokens, head_dim = shape
    expected = heads * tokens * head_dim * element_size(dtype_code)
    if len(keys) != expected or len(values) != expected:
        raise InvalidRequest(
            f"layer {layer}: keys/values hold {len(keys)}/{len(values)} bytes, expected {expected} "
            f"for shape [H={heads}, n={tokens}, D={head_dim}]"
        )
    flags = 0
    payload = [keys, values]
    if bias is not None:
        if len(bias) != 4 * heads * tokens:
            raise InvalidRequest(f"layer {layer}: bias holds {len(bias)} bytes, expected {4 * heads * tokens} (float32 [H, n])")
        flags |= FLAG_BIAS
        payload.append(bias)
    prefix = _BLOCK_HEADER.pack(BLOCK_MAGIC, BLOCK_VERSION, dtype_code, flags, layer, heads, head_dim, tokens, b"")[:_CHECKSUM_OFFSET]
    checksum = _block_checksum(key, prefix, payload)
    data = b"".join([prefix, checksum, *payload])
    return Block(key, layer, heads, tokens, head_dim, dtype_code, bool(flags & FLAG_BIAS), data)


def block_record_bytes(shape: tuple[int, int, int], dtype_code: int, has_bias: bool) -> int:
    """Size of the encoded record of a block of ``shape`` (H, n, D)."""
    heads, tokens, head_dim = shape
    return BLOCK_HEADER_BYTES + 2 * heads * tokens * head_dim * element_size(dtype_code) + (4 * heads * tokens if has_bias else 0)


def new_block_record(layer: int, shape: tuple[int, int, int], dtype_code: int, has_bias: bool) -> bytearray:
    """An unsealed record of ``shape``: its header (checksum still zero), payload to be filled
    in place (``record_payload``), then ``seal_block_record``. Saves one copy per block."""
    heads, tokens, head_dim = shape
    record = bytearray(block_record_bytes(shape, dtype_code, has_bias))
    _BLOCK_HEADER.pack_into(record, 0, BLOCK_MAGIC, BLOCK_VERSION, dtype_code, FLAG_BIAS if has_bias else 0, layer, heads, head_dim, tokens, b"")
    return record


def reset_block_record(record: bytearray, layer: int, shape: tuple[int, int, int], dtype_code: int, has_bias: bool) -> bytearray:
    """Reuse a written record of the same size for another block: a fresh header (checksum zero);
    the caller overwrites the whole payload before sealing it."""
    heads, tokens, head_dim = shape
    _BLOCK_HEADER.pack_into(record, 0, BLOCK_MAGIC, BLOCK_VERSION, dtype_code, FLAG_BIAS if has_bias else 0, layer, heads, head_dim, tokens, b"")
    return record


def record_payload(record: bytearray, shape: tuple[int, int, int], dtype_code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Writable raw-bit views into an unsealed record: keys, values [H, n, D], bias [H, n] or None."""
    heads, tokens, head_dim = shape
    raw = RAW_DTYPES[dtype_code]
    kv = heads * tokens * head_dim
    keys = np.frombuffer(record, dtype=raw, count=kv, offset=BLOCK_HEADER_BYTES).reshape(shape)
    values = np.frombuffer(record, dtype=raw, count=kv, offset=BLOCK_HEADER_BYTES + kv * raw.itemsize).reshape(shape)
    bias = None
    if len(record) > BLOCK_HEADER_BYTES + 2 * kv * raw.itemsize:
        bias = np.frombuffer(record, dtype="<f4", count=heads * tokens, offset=BLOCK_HEADER_BYTES + 2 * kv * raw.itemsize).reshape(heads, tokens)
    return keys, values, bias


def seal_block_record(key: bytes, record: bytearray) -> bytearray:
    """Write the checksum of a filled record bound to its storage ``key``; returns ``record``."""
    view = memoryview(record)
    record[_CHECKSUM_OFFSET:BLOCK_HEADER_BYTES] = _block_checksum(key, view[:_CHECKSUM_OFFSET], [view[BLOCK_HEADER_BYTES:]])
    return record


def decode_block(key: bytes, data: bytes | memoryview, verify: bool = True) -> Block:
    """Parse (and by default verify) a block record; raises CorruptData on any mismatch."""
    if len(data) < BLOCK_HEADER_BYTES:
        raise CorruptData(f"block {key.hex()}: record of {len(data)} bytes is shorter than its header")
    magic, version, dtype_code, flags, layer, heads, head_dim, tokens, checksum = _BLOCK_HEADER.unpack_from(data)
    if magic != BLOCK_MAGIC or version != BLOCK_VERSION or dtype_code not in CODE_DTYPES:
        raise CorruptData(f"block {key.hex()}: bad header (magic {magic!r}, version {version}, dtype {dtype_code})")
    has_bias = bool(flags & FLAG_BIAS)
    kv = heads * tokens * head_dim * element_size(dtype_code)
    expected = BLOCK_HEADER_BYTES + 2 * kv + (4 * heads * tokens if has_bias else 0)
    if len(data) != expected:
        raise CorruptData(f"block {key.hex()}: record is {len(data)} bytes, header implies {expected}")
    view = memoryview(data)
    if verify:
        actual = _block_checksum(key, bytes(view[:_CHECKSUM_OFFSET]), [view[BLOCK_HEADER_BYTES:]])
        if actual != checksum:
            raise CorruptData(f"block {key.hex()} (layer {layer}) failed its checksum: stored data is damaged")
    return Block(key, layer, heads, tokens, head_dim, dtype_code, has_bias, bytes(data) if not isinstance(data, bytes) else data)


def _session_checksum(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(key + body, digest_size=16, person=b"kvmem-session").digest()


def encode_session(key: bytes, record: SessionRecord) -> bytes:
    """Serialise a session record (JSON metadata + packed arrays) with a checksum bound to key."""
    meta = {
        "tenant": record.tenant,
        "session_id": record.session_id,
        "spec": record.spec.to_dict(),
        "logical_length": record.logical_length,
        "has_bias": record.has_bias,
        "chained": record.chained,
        "created_at_ms": record.created_at_ms,
        "updated_at_ms": record.updated_at_ms,
        "expires_at_ms": record.expires_at_ms,
        "parent_session_id": record.parent_session_id,
        "fork_offset": record.fork_offset,
        "version": record.version,
        "labels": record.labels,
    }
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    tokens = np.ascontiguousarray(record.token_ids, dtype="<u4").tobytes()
    positions = b"" if record.positions is None else np.ascontiguousarray(record.positions, dtype="<i8").tobytes()
    refs = b"".join(_BLOCK_REF.pack(ref.key, ref.start, ref.count) for ref in record.blocks)
    n_positions = 0 if record.positions is None else len(record.positions)
    counts = struct.pack("<IIII", len(meta_bytes), record.num_tokens, n_positions, len(record.blocks))
    body = counts + meta_bytes + tokens + positions + refs
    header = _SESSION_HEADER.pack(SESSION_MAGIC, SESSION_VERSION, len(meta_bytes), record.num_tokens, n_positions, len(record.blocks), _session_checksum(key, body))
    return header + meta_bytes + tokens + positions + refs


def decode_session(key: bytes, data: bytes | memoryview) -> SessionRecord:
    """Parse and verify a session record; raises CorruptData on any mismatch."""
    data = bytes(data)
    if len(data) < _SESSION_HEADER.size:
        raise CorruptData(f"session record {key!r} is truncated")
    magic, version, meta_len, n_tokens, n_positions, n_blocks, checksum = _SESSION_HEADER.unpack_from(data)
    if magic != SESSION_MAGIC or version != SESSION_VERSION:
        raise CorruptData(f"session record {key!r} has a bad header (magic {magic!r}, version {version})")
    rest = data[_SESSION_HEADER.size :]
    expected = meta_len + 4 * n_tokens + 8 * n_positions + _BLOCK_REF.size * n_blocks
    if len(rest) != expected:
        raise CorruptData(f"session record {key!r} is {len(rest)} bytes past its header, expected {expected}")
    body = struct.pack("<IIII", meta_len, n_tokens, n_positions, n_blocks) + rest
    if _session_checksum(key, body) != checksum:
        raise CorruptData(f"session record {key!r} failed its checksum: stored metadata is damaged")
    meta = json.loads(rest[:meta_len])
    offset = meta_len
    tokens = np.frombuffer(rest, dtype="<u4", count=n_tokens, offset=offset).copy()
    offset += 4 * n_tokens
    positions = None
    if n_positions:
        positions = np.frombuffer(rest, dtype="<i8", count=n_positions, offset=offset).copy()
        offset += 8 * n_positions
    blocks = [BlockRef(*_BLOCK_REF.unpack_from(rest, offset + i * _BLOCK_REF.size)) for i in range(n_blocks)]
    return SessionRecord(
        tenant=meta["tenant"],
        session_id=meta["session_id"],
        spec=ModelSpec.from_dict(meta["spec"]),
        token_ids=tokens,
        blocks=blocks,
        positions=positions,
        logical_length=meta["logical_length"],
        has_bias=meta["has_bias"],
        chained=meta["chained"],
        created_at_ms=meta["created_at_ms"],
        updated_at_ms=meta["updated_at_ms"],
        expires_at_ms=meta["expires_at_ms"],
        parent_session_id=meta["parent_session_id"],
        fork_offset=meta["fork_offset"],
        version=meta["version"],
        labels=meta["labels"],
    )


def dtype_code_of(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


# ---------------------------------------------------------------------------------------- aux
AUX_MAGIC = b"KVX1"
AUX_VERSION = 1
_AUX_HEADER = struct.Struct("<4sBxxxqQ16s")  # magic ver | created_at_ms session_version | checksum


@dataclass(frozen=True)
class AuxRecord:
    """Data attached to one session (its text, a search index), tagged with the session
    generation it was derived from: (created_at_ms, version) of the SessionRecord."""

    created_at_ms: int
    session_version: int
    payload: bytes

    def matches(self, record: SessionRecord) -> bool:
        """True when this record was derived from exactly this generation of the session."""
        return self.created_at_ms == record.created_at_ms and self.session_version == record.version


def encode_aux(key: bytes, created_at_ms: int, session_version: int, payload: bytes) -> bytes:
    prefix = _AUX_HEADER.pack(AUX_MAGIC, AUX_VERSION, created_at_ms, session_version, b"")[:-16]
    return prefix + _block_checksum(key, prefix, [payload]) + payload


def decode_aux(key: bytes, data: bytes | memoryview) -> AuxRecord:
    """Raises CorruptData when the record is truncated, foreign or fails its checksum."""
    data = bytes(data)
    if len(data) < _AUX_HEADER.size:
        raise CorruptData(f"aux record {key!r} is truncated ({len(data)} bytes)")
    magic, version, created, session_version, checksum = _AUX_HEADER.unpack_from(data)
    payload = data[_AUX_HEADER.size :]
    if magic != AUX_MAGIC or version != AUX_VERSION or _block_checksum(key, data[: _AUX_HEADER.size - 16], [payload]) != checksum:
        raise CorruptData(f"aux record {key!r} failed its integrity check")
    return AuxRecord(created, session_version, payload)
