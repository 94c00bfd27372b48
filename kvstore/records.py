"""Plain records the store keeps: sessions and the block references they are made of."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvstore.spec import ModelSpec


@dataclass(frozen=True)
class BlockRef:
    """One stored chunk of a session: tokens [start, start + count) of it.

    key: 16-byte chunk key. For plain (dedupable) sessions it is the prefix-hash chain key, so
    identical prefixes share blocks across sessions; for compacted sessions it is private.
    The chunk's KV is stored per layer under ``key + layer``.
    """

    key: bytes
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass
class SessionRecord:
    """Metadata of one stored session; its KV lives in the blocks it references.

    token_ids: uint32 [T]
    positions: int64 [T] original positions, or None for 0..T-1
    blocks:    ordered, contiguous, covering 0..T
    """

    tenant: str
    session_id: str
    spec: ModelSpec
    token_ids: np.ndarray
    blocks: list[BlockRef]
    positions: np.ndarray | None = None
    logical_length: int = 0
    has_bias: bool = False
    chained: bool = True  # block keys are prefix-chain keys (dedupable), not private
    created_at_ms: int = 0
    updated_at_ms: int = 0
    expires_at_ms: int = 0
    parent_session_id: str = ""
    fork_offset: int = 0
    version: int = 1
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values this session refers to, before deduplication."""
        return self.num_tokens * self.spec.bytes_per_token

    def positions_or_default(self) -> np.ndarray:
        """int64 [T]: stored positions, or 0..T-1."""
        if self.positions is not None:
            return self.positions
        return np.arange(self.num_tokens, dtype=np.int64)

    def is_expired(self, now_ms: int) -> bool:
        return self.expires_at_ms > 0 and now_ms >= self.expires_at_ms
