"""Chunk keys: a blake2b hash chain over token chunks, so identical prefixes are stored once.

Token ids are cut into fixed chunks of ``chunk_tokens``. The key of chunk i is

    blake2b(tenant, model spec digest, key of chunk i-1, token ids of chunk i)

so a key names a chunk *and everything before it* (a chunk's KV depends on its whole prefix).
Tenant and spec are inside every key: two tenants or two models never share a block. A partial
last chunk hashes its shorter token list, which gives it a different key from any full chunk.
Python's ``hash()`` is never used for anything persisted.
"""
from __future__ import annotations

import hashlib
import os
import struct

import numpy as np

KEY_BYTES = 16
ROOT_KEY = b"\x00" * KEY_BYTES


def _tokens_bytes(tokens: np.ndarray) -> bytes:
    return np.ascontiguousarray(tokens, dtype="<u4").tobytes()


def chain_key(tenant: str, spec_digest: bytes, previous: bytes, tokens: np.ndarray) -> bytes:
    """Key of one chunk given the key of the chunk before it (ROOT_KEY for the first)."""
    digest = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvmem-chunk")
    tenant_bytes = tenant.encode()
    digest.update(struct.pack("<I", len(tenant_bytes)) + tenant_bytes)
    digest.update(spec_digest)
    digest.update(previous)
    digest.update(struct.pack("<I", len(tokens)) + _tokens_bytes(tokens))
    return digest.digest()


def chunk_ranges(start: int, end: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """(start, count) of the chunk-aligned pieces of [start, end); ``start`` must be aligned."""
    return [(s, min(chunk_tokens, end - s)) for s in range(start, end, chunk_tokens)]


def chain_keys(tenant: str, spec_digest: bytes, token_ids: np.ndarray, chunk_tokens: int, previous: bytes = ROOT_KEY, start: int = 0) -> list[bytes]:
    """Keys of the chunks of token_ids[start:], continuing the chain from ``previous``."""
    keys = []
    for s, count in chunk_ranges(start, len(token_ids), chunk_tokens):
        previous = chain_key(tenant, spec_digest, previous, token_ids[s : s + count])
        keys.append(previous)
    return keys


def private_key() -> bytes:
    """A fresh random key for blocks that cannot be shared (compacted caches)."""
    return os.urandom(KEY_BYTES)


def block_storage_key(chunk_key: bytes, layer: int) -> bytes:
    """LMDB key of one layer of one chunk: chunk key + big-endian layer (sorted by chunk)."""
    return chunk_key + struct.pack(">H", layer)
