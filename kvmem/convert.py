"""Protobuf <-> domain conversions shared by the server and the client."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from kvmem.v1 import kvmem_pb2 as pb
from kvstore.errors import InvalidRequest
from kvstore.records import SessionRecord
from kvstore.spec import ModelSpec

DTYPE_TO_PB = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16}
PB_TO_DTYPE = {value: key for key, value in DTYPE_TO_PB.items()}
DEFAULT_TENANT = "default"
MAX_CHUNK_BYTES = 2 << 20  # tensor bytes per stream message


def spec_to_pb(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(
        name=spec.name,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=DTYPE_TO_PB[spec.dtype],
        rope_json=spec.rope_json,
        max_position=spec.max_position,
    )


def spec_from_pb(message: pb.ModelSpec) -> ModelSpec:
    """Raises InvalidRequest for a missing or malformed spec."""
    if message.dtype not in PB_TO_DTYPE:
        raise InvalidRequest("model spec is missing or its dtype is unspecified; send float32, float16 or bfloat16")
    return ModelSpec(
        name=message.name,
        num_layers=message.num_layers,
        num_kv_heads=message.num_kv_heads,
        head_dim=message.head_dim,
        dtype=PB_TO_DTYPE[message.dtype],
        rope_json=message.rope_json,
        max_position=message.max_position,
    )


def session_info(record: SessionRecord) -> pb.SessionInfo:
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
