"""The one place that converts between vLLM's paged KV buffers and kvmem's [H, T, D].

A vLLM worker keeps one KV tensor per attention layer, cut into blocks of ``block_size``
token slots; a request's token t lives in block ``block_ids[t // block_size]`` at offset
``t % block_size``. Two physical layouts are handled (both with the blocks on dim 0 or 1):

    cpu:   [num_blocks, H, block_size, 2 * D]  (vLLM's CPU backend: per block and head, the
           block's keys [block_size, D] then its values [block_size, D])
    flash: [2, num_blocks, block_size, H, D]   (FlashAttention / Triton backends on CUDA)

Anything else (MLA's latent cache, fp8 scales, head-interleaved variants) is refused by
``PagedLayout.detect`` with the shape it saw, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PagedLayout:
    """How one layer's paged buffer holds keys and values. kind: "cpu" or "flash"."""

    kind: str
    block_size: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def detect(cls, kv_cache: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int) -> "PagedLayout":
        """The layout of ``kv_cache``, checked against the model's H and D; ValueError otherwise."""
        shape = tuple(kv_cache.shape)
        if len(shape) == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_dim):
            return cls("cpu", block_size, num_kv_heads, head_dim)
        if len(shape) == 5 and shape[0] == 2 and shape[2:] == (block_size, num_kv_heads, head_dim):
            return cls("flash", block_size, num_kv_heads, head_dim)
        raise ValueError(
            f"unsupported vLLM KV cache layout {shape} for block_size={block_size}, {num_kv_heads} KV heads of "
            f"dimension {head_dim}: kvmem's connector knows [blocks, H, block_size, 2*D] (CPU) and "
            "[2, blocks, block_size, H, D] (FlashAttention); MLA and tensor-parallel shards are not supported"
        )

    def _split(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and values as [num_blocks, H, block_size, D] (strided, no copy)."""
        if self.kind == "cpu":
            blocks = kv_cache.view(kv_cache.shape[0], self.num_kv_heads, 2, self.block_size, self.head_dim)
            return blocks[:, :, 0], blocks[:, :, 1]
        return kv_cache[0].permute(0, 2, 1, 3), kv_cache[1].permute(0, 2, 1, 3)

    def _spans(self, block_ids: Sequence[int], start: int, end: int):
        """(block id, first offset in the block, tokens, first index in the [start, end) run) per block."""
        size = self.block_size
        token = start
        while token < end:
            offset = token % size
            count = min(size - offset, end - token)
            yield block_ids[token // size], offset, count, token - start
            token += count

    def gather(self, kv_cache: torch.Tensor, block_ids: Sequence[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of tokens [start, end) as (keys, values) [H, end - start, D] on the CPU.

        A copy, never a view: vLLM reuses freed blocks, and a slice of the paged buffer would
        pin (and pickle) the whole buffer."""
        self._check_range(block_ids, start, end)
        keys_view, values_view = self._split(kv_cache)
        shape = (self.num_kv_heads, end - start, self.head_dim)
        keys = torch.empty(shape, dtype=kv_cache.dtype)
        values = torch.empty(shape, dtype=kv_cache.dtype)
        for block, offset, count, at in self._spans(block_ids, start, end):
            keys[:, at : at + count].copy_(keys_view[block, :, offset : offset + count])
            values[:, at : at + count].copy_(values_view[block, :, offset : offset + count])
        return keys, values

    def scatter(self, kv_cache: torch.Tensor, block_ids: Sequence[int], start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys/values [H, n, D] (any device, the buffer's dtype) into tokens [start, start + n)."""
        count_all = keys.shape[1]
        if keys.shape != (self.num_kv_heads, count_all, self.head_dim) or values.shape != keys.shape:
            raise ValueError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} are not [{self.num_kv_heads}, n, {self.head_dim}]")
        if keys.dtype != kv_cache.dtype or values.dtype != kv_cache.dtype:
            raise ValueError(f"KV dtype {keys.dtype} does not match the paged buffer's {kv_cache.dtype}")
        self._check_range(block_ids, start, start + count_all)
        keys_view, values_view = self._split(kv_cache)
        keys, values = keys.to(kv_cache.device), values.to(kv_cache.device)
        for block, offset, count, at in self._spans(block_ids, start, start + count_all):
            keys_view[block, :, offset : offset + count].copy_(keys[:, at : at + count])
            values_view[block, :, offset : offset + count].copy_(values[:, at : at + count])

    def _check_range(self, block_ids: Sequence[int], start: int, end: int) -> None:
        if not 0 <= start <= end or end > len(block_ids) * self.block_size:
            raise ValueError(f"tokens [{start}, {end}) do not fit the request's {len(block_ids)} blocks of {self.block_size}")
