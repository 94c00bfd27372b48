"""Protobuf <-> domain conversions shared by the server and the client."""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from kvmem.v1 import kvmem_pb2 as pb
from kvstore.errors import InvalidRequest
from kvstore.spec import MAX_FINGERPRINT_CHARS, MAX_POSITION_LIMIT, ModelSpec

DTYPE_TO_PB = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16}
PB_TO_DTYPE = {value: key for key, value in DTYPE_TO_PB.items()}
DEFAULT_TENANT = "default"
MAX_CHUNK_BYTES = 2 << 20  # tensor bytes per stream message
_LOWER_HEX = re.compile(r"[0-9a-f]*")


def spec_to_pb(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(
        name=spec.name,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=DTYPE_TO_PB[spec.dtype],
        rope_json=spec.rope_json,
        max_position=spec.max_position,
        weights_fingerprint=spec.weights_fingerprint,
    )


def spec_from_pb(message: pb.ModelSpec, *, stored: bool = False) -> ModelSpec:
    """The domain spec of a request's ModelSpec; raises InvalidRequest for a missing or malformed one.

    A request must name the model's context window (max_position in 1..2^62). ``stored=True``
    reads a spec the server sent back (SessionInfo.model): records of older versions may carry
    max_position 0 there, and they must stay readable.
    """
    if message.dtype not in PB_TO_DTYPE:
        raise InvalidRequest("model spec is missing or its dtype is unspecified; send float32, float16 or bfloat16")
    if not stored and not 1 <= message.max_position <= MAX_POSITION_LIMIT:
        raise InvalidRequest(f"model spec max_position must be in 1..2^62 (the model's context window), got {message.max_position}")
    fingerprint = message.weights_fingerprint
    if len(fingerprint) > MAX_FINGERPRINT_CHARS or not _LOWER_HEX.fullmatch(fingerprint):
        raise InvalidRequest(
            f"model spec weights_fingerprint must be lowercase hex of at most {MAX_FINGERPRINT_CHARS} characters, "
            f"or \"\" when unknown (got {len(fingerprint)} characters starting {fingerprint[:16]!r})"
        )
    return ModelSpec(
        name=message.name,
        num_layers=message.num_layers,
        num_kv_heads=message.num_kv_heads,
        head_dim=message.head_dim,
        dtype=PB_TO_DTYPE[message.dtype],
        rope_json=message.rope_json,
        max_position=message.max_position,
        weights_fingerprint=fingerprint,
    )


def session_info(record) -> pb.SessionInfo:
    """SessionInfo of a SessionRecord, or of a kvstore.catalog.DamagedSession (ids and damage only)."""
    damage = getattr(record, "damage", None)
    if damage is not None:
        return pb.SessionInfo(tenant=record.tenant, session_id=record.session_id, damage=damage)
    return pb.SessionInfo(
        tenant=record.tenant,
        session_id=record.session_id,
        model=spec_to_pb(record.spec),
        num_tokens=record.num_tokens,
        logical_length=record.logical_length,
        has_bias=record.has_bias,
        created_at_ms=record.created_at_ms,
        updated_at_ms=record.updated_at_ms,
        expires_at_ms=record.expires_at_ms,
        kv_bytes=record.kv_bytes,
        parent_session_id=record.parent_session_id,
        fork_offset=record.fork_offset,
        version=record.version,
        labels=record.labels,
    )


def tokens_array(values: Iterable[int]) -> np.ndarray:
    return np.fromiter(values, dtype=np.uint32)
