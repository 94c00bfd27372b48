"""The one place that converts between vLLM's paged KV buffers and kvmem's [H, T, D].

A vLLM worker keeps one KV tensor per attention layer, cut into blocks of ``block_size``
token slots; a request's token t lives in block ``block_ids[t // block_size]`` at offset
``t % block_size``. Two physical layouts are handled (both with the blocks on dim 0 or 1):

    cpu:   [num_blocks, H, block_size, 2 * D]  (vLLM's CPU backend: per block and head, a key
           region of block_size * D elements, then a value region of as many; inside a region
           the order is the attention kernel's own, which depends on the CPU's ISA: on AVX2 the
           keys are dimension-major [D, block_size], the values token-major. The connector
           measures the order once with vLLM's own cache-writing op (``probe_positions``) and
           passes it here as ``key_pos``/``value_pos``: element (t, d) of a block sits at
           ``key_pos[t * D + d]`` of its region.)
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
    """How one layer's paged buffer holds keys and values. kind: "cpu" or "flash"; for "cpu",
    key_pos/value_pos (long [block_size * D]) give each (token, dim)'s place in its region."""

    kind: str
    block_size: int
    num_kv_heads: int
    head_dim: int
    key_pos: torch.Tensor | None = None
    value_pos: torch.Tensor | None = None
    orders: tuple[str, str] = ("token", "token")  # of keys and values: see ``region_order``

    @classmethod
    def detect(cls, kv_cache: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int,
               key_pos: torch.Tensor | None = None, value_pos: torch.Tensor | None = None) -> "PagedLayout":
        """The layout of ``kv_cache``, checked against the model's H and D; ValueError otherwise.
        For the CPU layout, positions default to token-major order ([block_size, D])."""
        shape = tuple(kv_cache.shape)
        if len(shape) == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_dim):
            identity = torch.arange(block_size * head_dim)
            key_pos = identity if key_pos is None else key_pos
            value_pos = identity if value_pos is None else value_pos
            orders = (region_order(key_pos, block_size, head_dim), region_order(value_pos, block_size, head_dim))
            return cls("cpu", block_size, num_kv_heads, head_dim, key_pos, value_pos, orders)
        if len(shape) == 5 and shape[0] == 2 and shape[2:] == (block_size, num_kv_heads, head_dim):
            return cls("flash", block_size, num_kv_heads, head_dim)
        raise ValueError(
            f"unsupported vLLM KV cache layout {shape} for block_size={block_size}, {num_kv_heads} KV heads of "
            f"dimension {head_dim}: kvmem's connector knows [blocks, H, block_size, 2*D] (CPU) and "
            "[2, blocks, block_size, H, D] (FlashAttention); MLA and tensor-parallel shards are not supported"
        )

    def _spans(self, block_ids: Sequence[int], start: int, end: int):
        """(block id, first offset in the block, tokens, first index in the [start, end) run) per block."""
        size = self.block_size
        token = start
        while token < end:
            offset = token % size
            count = min(size - offset, end - token)
            yield block_ids[token // size], offset, count, token - start
            token += count

    def _regions(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """CPU layout: [num_blocks, H, 2 (keys, values), block_size * D] (a view)."""
        return kv_cache.view(kv_cache.shape[0], self.num_kv_heads, 2, self.block_size * self.head_dim)

    def _positions(self, which: int, offset: int, count: int) -> torch.Tensor:
        pos = self.key_pos if which == 0 else self.value_pos
        return pos.view(self.block_size, self.head_dim)[offset : offset + count].reshape(-1)

    def _split_aligned(self, start: int, end: int) -> tuple[int, int]:
        """[a, b): the whole blocks inside [start, end) (a == b when there are none)."""
        size = self.block_size
        a, b = -(-start // size) * size, (end // size) * size
        return (a, b) if a < b else (start, start)

    def _edges(self, block_ids: Sequence[int], start: int, end: int):
        """Spans of the partial blocks at either end of [start, end) (whole blocks go in one op)."""
        a, b = self._split_aligned(start, end)
        if a == b:
            yield from self._spans(block_ids, start, end)
            return
        yield from self._spans(block_ids, start, a)
        for block, offset, count, at in self._spans(block_ids, b, end):
            yield block, offset, count, at + (b - start)

    def _region_to_logical(self, regions: torch.Tensor, which: int) -> torch.Tensor:
        """[n, H, bs*D] in region order -> [n, H, bs, D] (a view where the order is a transpose)."""
        n, H, size, D = regions.shape[0], self.num_kv_heads, self.block_size, self.head_dim
        order = self.orders[which]
        if order == "token":
            return regions.view(n, H, size, D)
        if order == "dim":
            return regions.view(n, H, D, size).transpose(2, 3)
        return regions.index_select(2, self._positions(which, 0, size).to(regions.device)).view(n, H, size, D)

    def _logical_to_region(self, logical: torch.Tensor, which: int) -> torch.Tensor:
        """[n, H, bs, D] -> [n, H, bs*D] in region order."""
        n, H, size, D = logical.shape[0], self.num_kv_heads, self.block_size, self.head_dim
        order = self.orders[which]
        if order == "token":
            return logical.reshape(n, H, size * D)
        if order == "dim":
            return logical.transpose(2, 3).reshape(n, H, size * D)
        pos = self.key_pos if which == 0 else self.value_pos
        inverse = torch.empty_like(pos)
        inverse[pos] = torch.arange(pos.numel())
        return logical.reshape(n, H, size * D).index_select(2, inverse.to(logical.device))

    def _whole_blocks(self, kv_cache: torch.Tensor, which: int) -> torch.Tensor:
        """Keys (0) or values (1) as [num_blocks, H, block_size * D] (CPU: region order) / [num_blocks, block_size, H, D] (flash)."""
        return self._regions(kv_cache)[:, :, which] if self.kind == "cpu" else kv_cache[which]

    def gather(self, kv_cache: torch.Tensor, block_ids: Sequence[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of tokens [start, end) as (keys, values) [H, end - start, D] on the CPU.

        A copy, never a view: vLLM reuses freed blocks, and a slice of the paged buffer would
        pin (and pickle) the whole buffer. Whole blocks move in one indexing op per layer."""
        self._check_range(block_ids, start, end)
        H, D, size = self.num_kv_heads, self.head_dim, self.block_size
        out = [torch.empty((H, end - start, D), dtype=kv_cache.dtype) for _ in range(2)]
        a, b = self._split_aligned(start, end)
        if a < b:
            blocks = torch.tensor(list(block_ids[a // size : b // size]), dtype=torch.long, device=kv_cache.device)
            n = blocks.numel()
            for which in (0, 1):
                picked = self._whole_blocks(kv_cache, which).index_select(0, blocks)
                if self.kind == "cpu":  # [n, H, bs*D] in region order -> [H, n, bs, D]
                    logical = self._region_to_logical(picked, which).permute(1, 0, 2, 3)
                else:  # [n, bs, H, D]
                    logical = picked.permute(2, 0, 1, 3)
                out[which][:, a - start : b - start].view(H, n, size, D).copy_(logical)
        regions = self._regions(kv_cache) if self.kind == "cpu" else None
        for block, offset, count, at in self._edges(block_ids, start, end):
            for which in (0, 1):
                if regions is not None:
                    picked = regions[block, :, which][:, self._positions(which, offset, count)]  # [H, count * D]
                    out[which][:, at : at + count].copy_(picked.view(H, count, D))
                else:
                    out[which][:, at : at + count].copy_(kv_cache[which, block, offset : offset + count].permute(1, 0, 2))
        return out[0], out[1]

    def scatter(self, kv_cache: torch.Tensor, block_ids: Sequence[int], start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys/values [H, n, D] (any device, the buffer's dtype) into tokens [start, start + n)."""
        H, D, size = self.num_kv_heads, self.head_dim, self.block_size
        count_all = keys.shape[1]
        if keys.shape != (H, count_all, D) or values.shape != keys.shape:
            raise ValueError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} are not [{H}, n, {D}]")
        if keys.dtype != kv_cache.dtype or values.dtype != kv_cache.dtype:
            raise ValueError(f"KV dtype {keys.dtype} does not match the paged buffer's {kv_cache.dtype}")
        end = start + count_all
        self._check_range(block_ids, start, end)
        sources = (keys.to(kv_cache.device), values.to(kv_cache.device))
        a, b = self._split_aligned(start, end)
        if a < b:
            blocks = torch.tensor(list(block_ids[a // size : b // size]), dtype=torch.long, device=kv_cache.device)
            n = blocks.numel()
            for which in (0, 1):
                run = sources[which][:, a - start : b - start].reshape(H, n, size, D).permute(1, 0, 2, 3)  # [n, H, bs, D]
                if self.kind == "cpu":
                    placed = self._logical_to_region(run, which)  # [n, H, bs*D] in region order
                else:
                    placed = run.permute(0, 2, 1, 3)  # [n, bs, H, D]
                self._whole_blocks(kv_cache, which).index_copy_(0, blocks, placed.contiguous())
        regions = self._regions(kv_cache) if self.kind == "cpu" else None
        for block, offset, count, at in self._edges(block_ids, start, end):
            for which in (0, 1):
                if regions is not None:
                    target = regions[block, :, which]  # [H, block_size * D], a view of the buffer
                    target[:, self._positions(which, offset, count)] = sources[which][:, at : at + count].reshape(H, count * D)
                else:
                    kv_cache[which, block, offset : offset + count].copy_(sources[which][:, at : at + count].permute(1, 0, 2))

    def _check_range(self, block_ids: Sequence[int], start: int, end: int) -> None:
        if not 0 <= start <= end or end > len(block_ids) * self.block_size:
            raise ValueError(f"tokens [{start}, {end}) do not fit the request's {len(block_ids)} blocks of {self.block_size}")


def region_order(positions: torch.Tensor, block_size: int, head_dim: int) -> str:
    """"token" (a region is [block_size, D]), "dim" ([D, block_size], AVX2's keys: moved as a
    transposed view) or "other" (moved by index)."""
    size = block_size * head_dim
    if torch.equal(positions, torch.arange(size)):
        return "token"
    if torch.equal(positions, torch.arange(size).view(head_dim, block_size).t().reshape(-1)):
        return "dim"
    return "other"


def positions_from_probe(region_tokens: torch.Tensor, region_dims: torch.Tensor, block_size: int, head_dim: int) -> torch.Tensor:
    """key_pos/value_pos from one probe: ``region_tokens[p]`` / ``region_dims[p]`` are the token
    (1-based) and dimension (1-based) an attention kernel wrote at place p of a region
    ([block_size * D] each); ValueError unless every (token, dim) landed exactly once."""
    tokens = region_tokens.to(torch.long) - 1
    dims = region_dims.to(torch.long) - 1
    size = block_size * head_dim
    logical = tokens * head_dim + dims
    valid = (tokens >= 0) & (tokens < block_size) & (dims >= 0) & (dims < head_dim)
    if tokens.numel() != size or not bool(valid.all()) or torch.unique(logical).numel() != size:
        raise ValueError("the KV cache layout probe did not find every (token, dim) exactly once; this layout is not supported")
    positions = torch.empty(size, dtype=torch.long)
    positions[logical] = torch.arange(size)
    return positions
