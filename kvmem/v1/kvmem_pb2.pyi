from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType

class ModelSpec(_message.Message):
    __slots__ = ("name", "num_layers", "num_kv_heads", "head_dim", "dtype", "rope_json", "max_position", "weights_fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROPE_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DType
    rope_json: str
    max_position: int
    weights_fingerprint: str
    def __init__(self, name: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., rope_json: _Optional[str] = ..., max_position: _Optional[int] = ..., weights_fingerprint: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("layer", "token_start", "num_tokens", "dtype", "keys", "values", "bias")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    token_start: int
    num_tokens: int
    dtype: DType
    keys: bytes
    values: bytes
    bias: bytes
    def __init__(self, layer: _Optional[int] = ..., token_start: _Optional[int] = ..., num_tokens: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ..., bias: _Optional[bytes] = ...) -> None: ...

class KVChunks(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[KVChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[KVChunk, _Mapping]]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("tenant", "session_id", "model", "num_tokens", "logical_length", "has_bias", "created_at_ms", "updated_at_ms", "expires_at_ms", "kv_bytes", "parent_session_id", "fork_offset", "version", "labels", "damage")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_BIAS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARENT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FORK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DAMAGE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    model: ModelSpec
    num_tokens: int
    logical_length: int
    has_bias: bool
    created_at_ms: int
    updated_at_ms: int
    expires_at_ms: int
    kv_bytes: int
    parent_session_id: str
    fork_offset: int
    version: int
    labels: _containers.ScalarMap[str, str]
    damage: str
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., num_tokens: _Optional[int] = ..., logical_length: _Optional[int] = ..., has_bias: _Optional[bool] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., parent_session_id: _Optional[str] = ..., fork_offset: _Optional[int] = ..., version: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., damage: _Optional[str] = ...) -> None: ...

class SaveHeader(_message.Message):
    __slots__ = ("tenant", "session_id", "model", "token_ids", "positions", "logical_length", "has_bias", "ttl_seconds", "overwrite", "reuse_prefix_tokens", "text")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_BIAS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    REUSE_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    model: ModelSpec
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    logical_length: int
    has_bias: bool
    ttl_seconds: int
    overwrite: bool
    reuse_prefix_tokens: int
    text: str
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., logical_length: _Optional[int] = ..., has_bias: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., overwrite: _Optional[bool] = ..., reuse_prefix_tokens: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("num_chunks",)
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    def __init__(self, num_chunks: _Optional[int] = ...) -> None: ...

class SaveSessionRequest(_message.Message):
    __slots__ = ("header", "chunks", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: SaveHeader
    chunks: KVChunks
    commit: Commit
    def __init__(self, header: _Optional[_Union[SaveHeader, _Mapping]] = ..., chunks: _Optional[_Union[KVChunks, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ...) -> None: ...

class SaveSessionResponse(_message.Message):
    __slots__ = ("session", "deduplicated_tokens", "bytes_written")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    deduplicated_tokens: int
    bytes_written: int
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., deduplicated_tokens: _Optional[int] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class RestoreSessionRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "model", "token_start", "token_end", "lookup_token_ids", "recall_for", "recall_tokens")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RECALL_FOR_FIELD_NUMBER: _ClassVar[int]
    RECALL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    model: ModelSpec
    token_start: int
    token_end: int
    lookup_token_ids: _containers.RepeatedScalarFieldContainer[int]
    recall_for: _containers.RepeatedScalarFieldContainer[int]
    recall_tokens: int
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., lookup_token_ids: _Optional[_Iterable[int]] = ..., recall_for: _Optional[_Iterable[int]] = ..., recall_tokens: _Optional[int] = ...) -> None: ...

class RestoreHeader(_message.Message):
    __slots__ = ("session", "token_start", "token_end", "token_ids", "positions", "num_chunks", "recalled_tokens", "recall_bytes_read")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    RECALLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECALL_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    token_start: int
    token_end: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    num_chunks: int
    recalled_tokens: int
    recall_bytes_read: int
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., num_chunks: _Optional[int] = ..., recalled_tokens: _Optional[int] = ..., recall_bytes_read: _Optional[int] = ...) -> None: ...

class RestoreSessionResponse(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: RestoreHeader
    chunks: KVChunks
    def __init__(self, header: _Optional[_Union[RestoreHeader, _Mapping]] = ..., chunks: _Optional[_Union[KVChunks, _Mapping]] = ...) -> None: ...

class AppendHeader(_message.Message):
    __slots__ = ("tenant", "session_id", "model", "token_ids", "expected_num_tokens", "ttl_seconds", "text")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    model: ModelSpec
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    expected_num_tokens: int
    ttl_seconds: int
    text: str
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., expected_num_tokens: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class AppendSessionRequest(_message.Message):
    __slots__ = ("header", "chunks", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: AppendHeader
    chunks: KVChunks
    commit: Commit
    def __init__(self, header: _Optional[_Union[AppendHeader, _Mapping]] = ..., chunks: _Optional[_Union[KVChunks, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ...) -> None: ...

class AppendSessionResponse(_message.Message):
    __slots__ = ("session", "bytes_written")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    bytes_written: int
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("tenant", "source_session_id", "target_session_id", "at_token", "ttl_seconds", "overwrite")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    source_session_id: str
    target_session_id: str
    at_token: int
    ttl_seconds: int
    overwrite: bool
    def __init__(self, tenant: _Optional[str] = ..., source_session_id: _Optional[str] = ..., target_session_id: _Optional[str] = ..., at_token: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class ForkSessionResponse(_message.Message):
    __slots__ = ("session", "shared_tokens", "copied_tokens")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COPIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    shared_tokens: int
    copied_tokens: int
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., shared_tokens: _Optional[int] = ..., copied_tokens: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("tenant", "model", "token_ids")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: ModelSpec
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("matched_tokens", "chunk_tokens")
    MATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    matched_tokens: int
    chunk_tokens: int
    def __init__(self, matched_tokens: _Optional[int] = ..., chunk_tokens: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("tenant", "session_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("tenant", "session_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("bytes_freed",)
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    bytes_freed: int
    def __init__(self, bytes_freed: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("tenant", "sessions", "stored_bytes", "logical_bytes", "max_sessions", "max_stored_bytes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    sessions: int
    stored_bytes: int
    logical_bytes: int
    max_sessions: int
    max_stored_bytes: int
    def __init__(self, tenant: _Optional[str] = ..., sessions: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_stored_bytes: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "bytes_used", "capacity_bytes", "entries", "hits", "misses", "hit_rate", "promotions", "evictions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    bytes_used: int
    capacity_bytes: int
    entries: int
    hits: int
    misses: int
    hit_rate: float
    promotions: int
    evictions: int
    def __init__(self, name: _Optional[str] = ..., bytes_used: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ..., promotions: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("tiers", "sessions", "chunks", "logical_bytes", "stored_bytes", "lmdb_map_bytes", "lmdb_used_bytes", "chunk_tokens", "usage")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LMDB_MAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    LMDB_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    sessions: int
    chunks: int
    logical_bytes: int
    stored_bytes: int
    lmdb_map_bytes: int
    lmdb_used_bytes: int
    chunk_tokens: int
    usage: TenantUsage
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., sessions: _Optional[int] = ..., chunks: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., lmdb_map_bytes: _Optional[int] = ..., lmdb_used_bytes: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., usage: _Optional[_Union[TenantUsage, _Mapping]] = ...) -> None: ...

class ReferenceQueries(_message.Message):
    __slots__ = ("num_query_heads", "num_queries", "layers")
    NUM_QUERY_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERIES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    num_query_heads: int
    num_queries: int
    layers: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, num_query_heads: _Optional[int] = ..., num_queries: _Optional[int] = ..., layers: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "method", "ratio", "budget", "target_session_id", "replace", "queries", "held_out", "options", "overwrite", "drop_source")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    DROP_SOURCE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    method: str
    ratio: float
    budget: int
    target_session_id: str
    replace: bool
    queries: ReferenceQueries
    held_out: ReferenceQueries
    options: _containers.ScalarMap[str, str]
    overwrite: bool
    drop_source: bool
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., method: _Optional[str] = ..., ratio: _Optional[float] = ..., budget: _Optional[int] = ..., target_session_id: _Optional[str] = ..., replace: _Optional[bool] = ..., queries: _Optional[_Union[ReferenceQueries, _Mapping]] = ..., held_out: _Optional[_Union[ReferenceQueries, _Mapping]] = ..., options: _Optional[_Mapping[str, str]] = ..., overwrite: _Optional[bool] = ..., drop_source: _Optional[bool] = ...) -> None: ...

class ReferencePart(_message.Message):
    __slots__ = ("held_out", "layer", "num_query_heads", "query_start", "num_queries", "data")
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERY_HEADS_FIELD_NUMBER: _ClassVar[int]
    QUERY_START_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERIES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    held_out: bool
    layer: int
    num_query_heads: int
    query_start: int
    num_queries: int
    data: bytes
    def __init__(self, held_out: _Optional[bool] = ..., layer: _Optional[int] = ..., num_query_heads: _Optional[int] = ..., query_start: _Optional[int] = ..., num_queries: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class CompactStreamRequest(_message.Message):
    __slots__ = ("request", "references")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    request: CompactRequest
    references: ReferencePart
    def __init__(self, request: _Optional[_Union[CompactRequest, _Mapping]] = ..., references: _Optional[_Union[ReferencePart, _Mapping]] = ...) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("session", "method", "kept_tokens", "slots", "bytes_before", "bytes_after", "seconds", "heldout_attention_error")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ATTENTION_ERROR_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    method: str
    kept_tokens: float
    slots: int
    bytes_before: int
    bytes_after: int
    seconds: float
    heldout_attention_error: float
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., method: _Optional[str] = ..., kept_tokens: _Optional[float] = ..., slots: _Optional[int] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., seconds: _Optional[float] = ..., heldout_attention_error: _Optional[float] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "query_token_ids", "query_text", "query_vectors", "budget_tokens", "method", "include_kv", "dynamic_budget")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    QUERY_VECTORS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_KV_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_BUDGET_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    query_token_ids: _containers.RepeatedScalarFieldContainer[int]
    query_text: str
    query_vectors: ReferenceQueries
    budget_tokens: int
    method: str
    include_kv: bool
    dynamic_budget: bool
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., query_token_ids: _Optional[_Iterable[int]] = ..., query_text: _Optional[str] = ..., query_vectors: _Optional[_Union[ReferenceQueries, _Mapping]] = ..., budget_tokens: _Optional[int] = ..., method: _Optional[str] = ..., include_kv: _Optional[bool] = ..., dynamic_budget: _Optional[bool] = ...) -> None: ...

class RetrievedLayer(_message.Message):
    __slots__ = ("layer", "block_starts", "block_lengths", "scores", "entropy", "num_tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_STARTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    block_starts: _containers.RepeatedScalarFieldContainer[int]
    block_lengths: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    entropy: float
    num_tokens: int
    def __init__(self, layer: _Optional[int] = ..., block_starts: _Optional[_Iterable[int]] = ..., block_lengths: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., entropy: _Optional[float] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class RetrieveHeader(_message.Message):
    __slots__ = ("session", "method", "budget_tokens", "block_tokens", "sink_end", "recent_start", "index_rebuilt", "seconds", "num_chunks", "bytes_read")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SINK_END_FIELD_NUMBER: _ClassVar[int]
    RECENT_START_FIELD_NUMBER: _ClassVar[int]
    INDEX_REBUILT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    method: str
    budget_tokens: int
    block_tokens: int
    sink_end: int
    recent_start: int
    index_rebuilt: bool
    seconds: float
    num_chunks: int
    bytes_read: int
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., method: _Optional[str] = ..., budget_tokens: _Optional[int] = ..., block_tokens: _Optional[int] = ..., sink_end: _Optional[int] = ..., recent_start: _Optional[int] = ..., index_rebuilt: _Optional[bool] = ..., seconds: _Optional[float] = ..., num_chunks: _Optional[int] = ..., bytes_read: _Optional[int] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("header", "layer", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: RetrieveHeader
    layer: RetrievedLayer
    chunks: KVChunks
    def __init__(self, header: _Optional[_Union[RetrieveHeader, _Mapping]] = ..., layer: _Optional[_Union[RetrievedLayer, _Mapping]] = ..., chunks: _Optional[_Union[KVChunks, _Mapping]] = ...) -> None: ...

class SearchTextRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "query", "k")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    query: str
    k: int
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., query: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class TextHit(_message.Message):
    __slots__ = ("chunk", "score", "start_char", "end_char", "text")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    START_CHAR_FIELD_NUMBER: _ClassVar[int]
    END_CHAR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    chunk: int
    score: float
    start_char: int
    end_char: int
    text: str
    def __init__(self, chunk: _Optional[int] = ..., score: _Optional[float] = ..., start_char: _Optional[int] = ..., end_char: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class SearchTextResponse(_message.Message):
    __slots__ = ("hits", "index_rebuilt")
    HITS_FIELD_NUMBER: _ClassVar[int]
    INDEX_REBUILT_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[TextHit]
    index_rebuilt: bool
    def __init__(self, hits: _Optional[_Iterable[_Union[TextHit, _Mapping]]] = ..., index_rebuilt: _Optional[bool] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "query", "latency_budget_ms", "force_option", "forbid_options", "expected_followups", "max_new_tokens", "rag_budget_tokens", "kv_budget_tokens", "recall_budget_tokens")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    FORCE_OPTION_FIELD_NUMBER: _ClassVar[int]
    FORBID_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FOLLOWUPS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RAG_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECALL_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    query: str
    latency_budget_ms: int
    force_option: str
    forbid_options: _containers.RepeatedScalarFieldContainer[str]
    expected_followups: int
    max_new_tokens: int
    rag_budget_tokens: int
    kv_budget_tokens: int
    recall_budget_tokens: int
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., query: _Optional[str] = ..., latency_budget_ms: _Optional[int] = ..., force_option: _Optional[str] = ..., forbid_options: _Optional[_Iterable[str]] = ..., expected_followups: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., rag_budget_tokens: _Optional[int] = ..., kv_budget_tokens: _Optional[int] = ..., recall_budget_tokens: _Optional[int] = ...) -> None: ...

class PlanFeatures(_message.Message):
    __slots__ = ("context_tokens", "question_tokens", "window", "query_type", "has_text", "compacted_stored", "block_index_stored", "text_index_stored", "top1", "gap", "expected_followups")
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    QUERY_TYPE_FIELD_NUMBER: _ClassVar[int]
    HAS_TEXT_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_STORED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_STORED_FIELD_NUMBER: _ClassVar[int]
    TEXT_INDEX_STORED_FIELD_NUMBER: _ClassVar[int]
    TOP1_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FOLLOWUPS_FIELD_NUMBER: _ClassVar[int]
    context_tokens: int
    question_tokens: int
    window: int
    query_type: str
    has_text: bool
    compacted_stored: bool
    block_index_stored: bool
    text_index_stored: bool
    top1: float
    gap: float
    expected_followups: int
    def __init__(self, context_tokens: _Optional[int] = ..., question_tokens: _Optional[int] = ..., window: _Optional[int] = ..., query_type: _Optional[str] = ..., has_text: _Optional[bool] = ..., compacted_stored: _Optional[bool] = ..., block_index_stored: _Optional[bool] = ..., text_index_stored: _Optional[bool] = ..., top1: _Optional[float] = ..., gap: _Optional[float] = ..., expected_followups: _Optional[int] = ...) -> None: ...

class OptionEstimate(_message.Message):
    __slots__ = ("option", "feasible", "seconds", "question_seconds", "preparation_seconds", "quality", "quality_basis", "ruled_out")
    OPTION_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREPARATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    QUALITY_BASIS_FIELD_NUMBER: _ClassVar[int]
    RULED_OUT_FIELD_NUMBER: _ClassVar[int]
    option: str
    feasible: bool
    seconds: float
    question_seconds: float
    preparation_seconds: float
    quality: float
    quality_basis: str
    ruled_out: str
    def __init__(self, option: _Optional[str] = ..., feasible: _Optional[bool] = ..., seconds: _Optional[float] = ..., question_seconds: _Optional[float] = ..., preparation_seconds: _Optional[float] = ..., quality: _Optional[float] = ..., quality_basis: _Optional[str] = ..., ruled_out: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("choice", "reason", "forced", "latency_budget_s", "features", "options", "planning_seconds")
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PLANNING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    choice: str
    reason: str
    forced: bool
    latency_budget_s: float
    features: PlanFeatures
    options: _containers.RepeatedCompositeFieldContainer[OptionEstimate]
    planning_seconds: float
    def __init__(self, choice: _Optional[str] = ..., reason: _Optional[str] = ..., forced: _Optional[bool] = ..., latency_budget_s: _Optional[float] = ..., features: _Optional[_Union[PlanFeatures, _Mapping]] = ..., options: _Optional[_Iterable[_Union[OptionEstimate, _Mapping]]] = ..., planning_seconds: _Optional[float] = ...) -> None: ...

class AnswerResponse(_message.Message):
    __slots__ = ("decision", "text", "token_ids", "seconds", "stages")
    class StagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    seconds: float
    stages: _containers.ScalarMap[str, float]
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., seconds: _Optional[float] = ..., stages: _Optional[_Mapping[str, float]] = ...) -> None: ...
