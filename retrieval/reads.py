"""Reading only the tokens a request needs from a stored session, chunk by chunk.

Retrieval and recall select a few hundred or thousand tokens of a session that may hold a
quarter of a million; reading all of it to use 1% would make every request cost the session's
length in I/O and memory. These helpers read the stored chunks that hold the chosen tokens and
nothing else, and say how many bytes that was.
"""
from __future__ import annotations

import numpy as np
import torch

from kvstore.records import SessionRecord
from kvstore.store import SessionStore


def read_tokens(store: SessionStore, record: SessionRecord, tokens: list[np.ndarray]) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Keys, values [H, n_l, D] of ``tokens[l]`` (ascending session indices) per layer, reading
    only the stored chunks that hold them; and the bytes those chunks hold."""
    from kvstore.pieces import tensor_raw_view

    spec = record.spec
    keys = [torch.empty((spec.num_kv_heads, len(t), spec.head_dim), dtype=spec.torch_dtype) for t in tokens]
    values = [torch.empty((spec.num_kv_heads, len(t), spec.head_dim), dtype=spec.torch_dtype) for t in tokens]
    raw = [(tensor_raw_view(k), tensor_raw_view(v)) for k, v in zip(keys, values)]
    wanted = np.unique(np.concatenate(tokens)) if tokens else np.zeros(0, np.int64)
    bytes_read = 0
    for ref in record.blocks:
        lo, hi = np.searchsorted(wanted, [ref.start, ref.end])
        if lo == hi:
            continue
        needed = sorted({layer for layer, chosen in enumerate(tokens) if np.any((chosen >= ref.start) & (chosen < ref.end))})
        for block in store.load_chunk(record, ref, needed if len(needed) < len(tokens) else None):
            bytes_read += len(block.data)
            chosen = tokens[block.layer]
            inside = np.nonzero((chosen >= ref.start) & (chosen < ref.end))[0]
            if len(inside) == 0:
                continue
            block_keys, block_values, _ = block.raw_arrays()
            local = chosen[inside] - ref.start
            k, v = raw[block.layer]
            k[:, inside] = block_keys[:, local]
            v[:, inside] = block_values[:, local]
    return keys, values, bytes_read


def selected_kv(store: SessionStore, record: SessionRecord, tokens: np.ndarray | list[np.ndarray]):
    """A retrieval.context.SessionKV holding only ``tokens`` (ascending session indices) of a
    plain session: one array for every layer, or one per layer (each layer's chunks are then read
    for its own tokens only); positions cover the whole session (cheap: 8 bytes a token)."""
    from retrieval.context import SessionKV

    per_layer = isinstance(tokens, list)
    held = [np.asarray(t, dtype=np.int64) for t in tokens] if per_layer else np.asarray(tokens, dtype=np.int64)
    keys, values, bytes_read = read_tokens(store, record, held if per_layer else [held] * record.spec.num_layers)
    return SessionKV(keys, values, torch.from_numpy(record.positions_or_default().astype(np.int64)), held=held, bytes_read=bytes_read)


def probe_window(store: SessionStore, record: SessionRecord, config):
    """The SessionKV of what a probe pass attends to (retrieval.context.always_kept: the sinks and
    the recent window of ``config``, a RetrievalConfig), reading only their chunks."""
    from retrieval.context import always_kept

    return selected_kv(store, record, always_kept(record.num_tokens, config)[2])
