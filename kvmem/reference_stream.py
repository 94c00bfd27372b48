"""Reference queries streamed in pieces (CompactStream): collected under a byte bound, checked
against the session's model before compaction sees them.

A client that runs the model itself may have more reference queries than fit one message (9 query
heads x 4,096 queries x 64 dims x 30 layers of float32 is 283 MB). It sends them as ReferencePart
messages, each a slice [Hq, n, D] of one layer starting at ``query_start``; the server keeps the
raw bytes (bounded per stream), then checks that every layer is covered exactly once, with one
head count and one query count for all layers, and builds per-layer tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvstore.errors import CapacityExceeded, InvalidRequest


@dataclass
class _Piece:
    start: int
    count: int
    heads: int
    data: bytes


@dataclass
class ReferenceAssembler:
    """Collects ReferencePart messages of one stream; ``max_bytes`` bounds what it holds."""

    max_bytes: int
    received: int = 0
    pieces: dict[tuple[bool, int], list[_Piece]] = field(default_factory=dict)

    def add(self, part) -> None:
        if part.num_queries == 0 or part.num_query_heads == 0:
            raise InvalidRequest(f"reference part for layer {part.layer} has no queries (num_query_heads and num_queries must be > 0)")
        self.received += len(part.data)
        if self.received > self.max_bytes:
            raise CapacityExceeded(f"streamed reference queries exceed {self.max_bytes} bytes (server.max_reference_bytes); send fewer queries")
        self.pieces.setdefault((bool(part.held_out), int(part.layer)), []).append(_Piece(part.query_start, part.num_queries, part.num_query_heads, bytes(part.data)))

    def tensors(self, num_layers: int, num_kv_heads: int, head_dim: int) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """(queries, held_out): per layer float32 [Hq, N, D], or None where nothing was sent."""
        return self._which(False, num_layers, num_kv_heads, head_dim), self._which(True, num_layers, num_kv_heads, head_dim)

    def _which(self, held_out: bool, num_layers: int, num_kv_heads: int, head_dim: int) -> list[torch.Tensor] | None:
        name = "held-out queries" if held_out else "reference queries"
        layers = sorted(layer for which, layer in self.pieces if which == held_out)
        if not layers:
            return None
        if layers != list(range(num_layers)):
            raise InvalidRequest(f"streamed {name} cover layers {_ranges(layers)}; the model has layers 0..{num_layers - 1}, send each once")
        out, shape = [], None
        for layer in layers:
            pieces = sorted(self.pieces[(held_out, layer)], key=lambda p: p.start)
            heads = {p.heads for p in pieces}
            if len(heads) != 1 or next(iter(heads)) % num_kv_heads:
                raise InvalidRequest(f"{name}, layer {layer}: num_query_heads {sorted(heads)} must be one multiple of {num_kv_heads}")
            (hq,) = heads
            cursor, parts = 0, []
            for piece in pieces:
                if piece.start != cursor:
                    raise InvalidRequest(f"{name}, layer {layer}: a piece starts at query {piece.start}, expected {cursor} (pieces must cover 0..N-1 once)")
                expected = hq * piece.count * head_dim * 4
                if len(piece.data) != expected:
                    raise InvalidRequest(f"{name}, layer {layer}, queries {piece.start}+{piece.count}: {len(piece.data)} bytes, expected {expected} "
                                         f"(float32 [{hq}, {piece.count}, {head_dim}])")
                parts.append(torch.from_numpy(np.frombuffer(piece.data, dtype="<f4").reshape(hq, piece.count, head_dim).copy()))
                cursor += piece.count
            if shape is not None and (hq, cursor) != shape:
                raise InvalidRequest(f"{name}: layer {layer} has [{hq}, {cursor}] queries, layer 0 [{shape[0]}, {shape[1]}]; every layer needs the same")
            shape = (hq, cursor)
            tensor = torch.cat(parts, 1)
            if not torch.isfinite(tensor).all():
                raise InvalidRequest(f"{name}, layer {layer}: queries contain NaN or Inf")
            out.append(tensor)
        return out


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")


def reference_parts(tensors, held_out: bool, max_part_bytes: int):
    """ReferencePart messages for per-layer [Hq, n, D] tensors, each at most ~max_part_bytes."""
    from kvmem.v1 import kvmem_pb2 as pb

    for layer, tensor in enumerate(tensors):
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        heads, count, dim = data.shape
        step = max(1, max_part_bytes // max(1, heads * dim * 4))
        for start in range(0, count, step):
            piece = data[:, start:start + step].contiguous()
            yield pb.ReferencePart(held_out=held_out, layer=layer, num_query_heads=heads, query_start=start, num_queries=piece.shape[1],
                                   data=piece.numpy().tobytes())
