"""The one adapter between kvmem's layout and transformers' Cache classes.

kvmem's canonical layout is, per layer, keys and values shaped [H_kv, T, D] (batch 1,
post-RoPE). transformers 5.x keeps a cache as ``cache.layers[i].keys`` shaped [B, H_kv, T, D];
``DynamicCache.from_legacy_cache``/``to_legacy_cache`` no longer exist. Nothing else in kvmem
touches transformers' cache internals.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from kvstore.errors import InvalidRequest

LayerKV = tuple[torch.Tensor, torch.Tensor]


def cache_to_layers(cache: Any) -> list[LayerKV]:
    """Per-layer (keys, values), each [H_kv, T, D], from a DynamicCache or a legacy tuple cache.

    Views, not copies. Batch size must be 1; all layers must hold the same number of tokens
    (sliding-window layers that dropped tokens are not supported yet).
    """
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif isinstance(cache, (list, tuple)):
        pairs = [(entry[0], entry[1]) for entry in cache]
    else:
        raise InvalidRequest(f"expected a transformers Cache or a sequence of (keys, values), got {type(cache).__name__}")
    if not pairs or any(k is None or k.numel() == 0 for k, _ in pairs):
        raise InvalidRequest("the cache is empty or has uninitialised layers; run a prefill first")
    layers = []
    for index, (keys, values) in enumerate(pairs):
        if keys.dim() == 4:
            if keys.shape[0] != 1:
                raise InvalidRequest(f"layer {index}: batch size {keys.shape[0]}; kvmem stores one sequence per session (batch 1)")
            keys, values = keys[0], values[0]
        if keys.dim() != 3 or keys.shape != values.shape:
            raise InvalidRequest(f"layer {index}: keys {tuple(keys.shape)} / values {tuple(values.shape)} are not [H_kv, T, D]")
        layers.append((keys, values))
    lengths = {keys.shape[1] for keys, _ in layers}
    if len(lengths) != 1:
        raise InvalidRequest(f"layers hold different token counts {sorted(lengths)} (sliding-window cache?); not supported yet")
    return layers


def layers_to_cache(layers: Sequence[LayerKV], config: Any = None) -> Any:
    """A DynamicCache holding per-layer (keys, values) [H_kv, T, D], batch dim added.

    Plain full-attention layers share memory with ``layers`` (no copy: a restore would otherwise
    hold the KV twice); other layer kinds (sliding windows) go through their own ``update``.
    ``config`` (the model's config) makes transformers choose the right layer classes.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for index, (keys, values) in enumerate(layers):
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        if index >= len(cache.layers):
            cache.layers.append(DynamicLayer())
        layer = cache.layers[index]
        if type(layer) is DynamicLayer and not layer.is_initialized:
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        else:
            layer.update(keys, values)
    return cache


def cache_length(cache: Any) -> int:
    """Tokens held by the cache (its first layer)."""
    return int(cache_to_layers(cache)[0][0].shape[1])
