"""Blocks across tiers: memory tiers (fastest first) over the durable LMDB store.

A hit in a slower tier is promoted one tier up; a tier that overflows demotes its victims one
tier down. The last memory tier drops its victims, which is safe because LMDB holds every block
(writes are committed to LMDB before they are cached). Blocks read from LMDB are verified
against their checksum before anything sees them.
"""
from __future__ import annotations

from kvstore.chunking import block_storage_key
from kvstore.codec import Block, decode_block
from kvstore.errors import NotFound
from kvstore.lmdb_backend import LmdbBackend
from kvstore.tiers import MemoryTier, TierCounters


class TieredBlockStore:
    def __init__(self, backend: LmdbBackend, tiers: list[MemoryTier]):
        self.backend = backend
        self.tiers = tiers  # fastest first, e.g. [gpu, cpu] or [cpu]
        self.lmdb_counters = TierCounters()

    def get_chunk(self, chunk_key: bytes, num_layers: int) -> list[Block]:
        """All layers of one chunk, from the fastest tier that has each; raises NotFound/CorruptData."""
        blocks: list[Block | None] = [self._get_from_memory(block_storage_key(chunk_key, layer)) for layer in range(num_layers)]
        missing = [layer for layer, block in enumerate(blocks) if block is None]
        if missing:
            loaded = self._load(chunk_key, missing)
            for layer, block in zip(missing, loaded):
                blocks[layer] = block
                if self.tiers:
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
        with self.backend.read() as txn:
            db = self.backend.db["blocks"]
            for layer in layers:
                key = block_storage_key(chunk_key, layer)
                raw = txn.get(key, db=db)
                if raw is None:
                    self.lmdb_counters.misses += 1
                    raise NotFound(f"block {chunk_key.hex()} layer {layer} is missing: the session was deleted or changed while being read; retry")
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

    def cache(self, blocks: list[Block]) -> None:
        """Write-through: keep freshly committed blocks in the slowest memory tier."""
        if self.tiers:
            for block in blocks:
                self._place(len(self.tiers) - 1, block)

    def forget(self, storage_keys: list[bytes]) -> None:
        """Drop freed blocks from every memory tier."""
        for tier in self.tiers:
            for key in storage_keys:
                tier.delete(key)
