"""Prefill past the model's window: chunks attending to attention sinks + a sliding recent window.

A causal LM trained on an 8k window cannot prefill 32k tokens in one pass (positions past its
window are out of distribution, and full attention is quadratic). ``windowed_prefill`` feeds the
context in chunks; each chunk attends to the first ``sink_tokens`` tokens and the ``window_tokens``
before it, placed at packed positions below the window (StreamingLLM's scheme), and its keys are
then rotated to their *original* positions for storage. The stored session therefore looks like
any other (post-RoPE keys at positions 0..T-1): retrieval moves the blocks it selects to positions
the model can handle (retrieval/context.py). Cost is linear in T: each token attends to at most
sinks + window + chunk tokens.

What a token's KV cannot hold: anything beyond its window. Facts far apart are joined at question
time by retrieval, not inside the prefill.
"""
from __future__ import annotations

from typing import Any

import torch

from compaction.inference import CompactedCache
from kvstore.errors import InvalidRequest
from kvmem.hf_cache import cache_to_layers
from retrieval.rope import Rope


def windowed_prefill(model: Any, input_ids: torch.Tensor, window_tokens: int = 2048, sink_tokens: int = 4, chunk_tokens: int = 512) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """KV of ``input_ids`` [T] (or [1, T]) as per layer keys, values [H, T, D] (float32), keys
    post-RoPE at positions 0..T-1. Exactly a plain prefill while T <= sink + window + chunk."""
    ids = input_ids.view(-1)
    total = ids.numel()
    limit = int(model.config.get_text_config().max_position_embeddings)
    if sink_tokens + window_tokens + chunk_tokens > limit:
        raise InvalidRequest(f"sinks + window + chunk = {sink_tokens + window_tokens + chunk_tokens} exceeds the model's {limit}-token window")
    rope = Rope.from_model(model)
    layers = model.config.get_text_config().num_hidden_layers
    keys: list[torch.Tensor] = []  # per layer [H, T, D], filled chunk by chunk
    values: list[torch.Tensor] = []
    done = 0
    while done < total:
        end = min(total, done + chunk_tokens)
        sinks = list(range(min(sink_tokens, done)))
        recent = list(range(max(len(sinks), done - window_tokens), done))
        kept = torch.tensor(sinks + recent, dtype=torch.int64)
        packed = len(kept)
        if packed:
            rotation = rope.cos_sin(torch.arange(packed) - kept)  # to packed positions
            context = [(rope.rotate(keys[l][:, kept], 0, rotation), values[l][:, kept]) for l in range(layers)]
            cache = CompactedCache.for_model(model, context, [None] * layers, packed)
        else:
            cache = None
        chunk = ids[done:end].view(1, -1)
        positions = torch.arange(packed, packed + chunk.shape[1])
        with torch.no_grad():
            out = model(input_ids=chunk, cache=cache, position_ids=positions[None], use_cache=True)
        back = rope.cos_sin(torch.arange(done, end) - positions)  # to original positions
        for l, (k, v) in enumerate(cache_to_layers(out.cache)):
            if not keys or len(keys) <= l:
                heads, _, dim = k.shape
                keys.append(torch.empty(heads, total, dim))
                values.append(torch.empty(heads, total, dim))
            keys[l][:, done:end] = rope.rotate(k[:, packed:], 0, back)
            values[l][:, done:end] = v[:, packed:].float()
        done = end
    return keys, values
