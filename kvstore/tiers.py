"""Memory tiers: bounded-byte block caches.

A Tier is a narrow interface (get, put, delete, contains, bytes used, capacity). The durable
backend sits below all tiers and always holds every block, so a memory tier may drop a block
at any time without losing data; TieredBlockStore moves blocks between tiers. A quantized or
device tier plugs in by implementing the same protocol.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from kvstore.codec import Block
from kvstore.policy import EvictionPolicy, LRUPolicy


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    promotions: int = 0  # blocks that arrived here from a slower tier
    evictions: int = 0  # blocks pushed out by capacity pressure


class Tier(Protocol):
    name: str
    counters: TierCounters

    def get(self, key: bytes) -> Block | None: ...
    def put(self, block: Block) -> list[Block]: ...
    def delete(self, key: bytes) -> None: ...
    def contains(self, key: bytes) -> bool: ...
    def bytes_used(self) -> int: ...
    def capacity(self) -> int: ...
    def __len__(self) -> int: ...


class MemoryTier:
    """Encoded blocks held in process memory up to ``capacity_bytes``; ``put`` returns the
    blocks it evicted."""

    def __init__(self, name: str, capacity_bytes: int, policy_factory: Callable[[], EvictionPolicy] = LRUPolicy):
        self.name = name
        self._capacity = capacity_bytes
        self._policy = policy_factory()
        self._blocks: dict[bytes, Block] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.counters = TierCounters()

    def get(self, key: bytes) -> Block | None:
        with self._lock:
            block = self._blocks.get(key)
            if block is None:
                self.counters.misses += 1
                return None
            self.counters.hits += 1
            self._policy.accessed(key)
            return block

    def put(self, block: Block) -> list[Block]:
        """Insert (or refresh) a block; returns the blocks evicted to make room (maybe empty).

        A block larger than the whole capacity is not kept (returned as evicted at once).
        """
        if block.nbytes > self._capacity:
            return [block]
        evicted: list[Block] = []
        with self._lock:
            if block.key in self._blocks:
                self._policy.accessed(block.key)
                return evicted
            while self._used + block.nbytes > self._capacity:
                victim = self._policy.victim()
                if victim is None:
                    break
                evicted.append(self._remove_locked(victim))
                self.counters.evictions += 1
            self._blocks[block.key] = block
            self._used += block.nbytes
            self._policy.inserted(block.key)
        return evicted

    def _remove_locked(self, key: bytes) -> Block:
        block = self._blocks.pop(key)
        self._policy.removed(key)
        self._used -= block.nbytes
        return block

    def delete(self, key: bytes) -> None:
        with self._lock:
            if key in self._blocks:
                self._remove_locked(key)

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._blocks

    def bytes_used(self) -> int:
        return self._used

    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._blocks):
                self._remove_locked(key)
