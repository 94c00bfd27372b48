"""Blocks across tiers: memory tiers (fastest first, each a ``kvstore.tiers.Tier``) over the
durable backend (``kvstore.backend.Backend``, LMDB by default).

A hit in a slower tier is promoted one tier up; a tier that overflows demotes its victims one
tier down. The last memory tier drops its victims, which is safe because the backend holds
every block (a block reaches a memory tier only after it was read from the backend, never
before its commit). Blocks read from the backend are verified against their checksum before
anything sees them.
"""
from __future__ import annotations

from typing import Sequence

from kvstore.backend import Backend
from kvstore.chunking import block_storage_key
from kvstore.codec import Block, decode_block
from kvstore.errors import NotFound
from kvstore.tiers import Tier, TierCounters


class MissingBlock(NotFound):
    """A block the caller expected is not in the backend (the store decides: damage or change)."""


class TieredBlockStore:
    def __init__(self, backend: Backend, tiers: Sequence[Tier]):
        self.backend = backend
        self.tiers = list(tiers)  # fastest first
        self.lmdb_counters = TierCounters()

    def get_chunk(self, chunk_key: bytes, num_layers: int, layers: Sequence[int] | None = None, cache: bool = True) -> list[Block]:
        """Layers ``layers`` (default all) of one chunk, from the fastest tier that has each;
        raises MissingBlock / CorruptData. Only the blocks asked for are read. ``cache=False``:
        blocks read from disk are not placed in the memory tiers (a scan, such as an index build
        over a whole session, must not push out the blocks requests use)."""
        wanted = list(range(num_layers)) if layers is None else list(layers)
        blocks: list[Block | None] = [self._get_from_memory(block_storage_key(chunk_key, layer)) for layer in wanted]
        missing = [i for i, block in enumerate(blocks) if block is None]
        if missing:
            loaded = self._load(chunk_key, [wanted[i] for i in missing])
            for i, block in zip(missing, loaded):
                blocks[i] = block
                if self.tiers and cache:
                    self._place(len(self.tiers) - 1, block, promoted=True)
        return blocks  # type: ignore[return-value]

    def _get_from_memory(self, key: bytes) -> Block | None:
        for index, tier in enumerate(self.tiers):
            block = tier.get(key)
            if block is not None:
                if index > 0:
                    self._place(index - 1, block, promoted=True)
                return block
        return None

    def _load(self, chunk_key: bytes, layers: list[int]) -> list[Block]:
        blocks = []
        keys = [block_storage_key(chunk_key, layer) for layer in layers]
        with self.backend.read() as txn:
            # a networked backend reads them in one round trip per node; LMDB maps them in place
            many = txn.get_blocks(keys) if hasattr(txn, "get_blocks") else None
            for index, layer in enumerate(layers):
                key = keys[index]
                raw = many[index] if many is not None else txn.get("blocks", key)
                if raw is None:
                    self.lmdb_counters.misses += 1
                    raise MissingBlock(f"block {chunk_key.hex()} layer {layer} is missing")
                blocks.append(decode_block(key, raw))
        self.lmdb_counters.hits += len(layers)
        return blocks

    def _place(self, index: int, block: Block, promoted: bool = False) -> None:
        tier = self.tiers[index]
        if tier.contains(block.key):
            return
        if promoted:
            tier.counters.promotions += 1
        for victim in tier.put(block):
            if index + 1 < len(self.tiers):
                self._place(index + 1, victim)

    def forget(self, storage_keys: list[bytes]) -> None:
        """Drop freed blocks from every memory tier."""
        for tier in self.tiers:
            for key in storage_keys:
                tier.delete(key)
