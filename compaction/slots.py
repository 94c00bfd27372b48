"""Which original token each compacted slot is: stored beside a compacted session (aux record
``compaction/slots``) so recall (retrieval/recall.py) can tell a recalled token from a slot that
already holds it."""
from __future__ import annotations

import numpy as np
import torch

from kvstore.errors import CorruptData

SLOTS_AUX = "compaction/slots"  # int32 [L, H, t]: the original token index of every slot (-1 = padding)


def slots_to_bytes(indices: list[torch.Tensor]) -> bytes:
    """Encode per-layer slot indices [H, t] (one t for all layers) as int32 [L, H, t] + a shape header."""
    stacked = torch.stack([i.to(torch.int64) for i in indices]).numpy().astype("<i4")
    header = np.asarray(stacked.shape, dtype="<u4").tobytes()
    return header + stacked.tobytes()


def slots_from_bytes(raw: bytes, layers: int, heads: int, slots: int) -> list[torch.Tensor]:
    """Inverse of ``slots_to_bytes``; CorruptData when the shape is not [layers, heads, slots]."""
    if len(raw) < 12:
        raise CorruptData("slot indices record is truncated")
    shape = tuple(int(x) for x in np.frombuffer(raw[:12], dtype="<u4"))
    if shape != (layers, heads, slots) or len(raw) != 12 + 4 * layers * heads * slots:
        raise CorruptData(f"slot indices record holds {shape}, the session [{layers}, {heads}, {slots}]")
    data = np.frombuffer(raw[12:], dtype="<i4").reshape(shape).astype(np.int64)
    return [torch.from_numpy(data[l].copy()) for l in range(layers)]
