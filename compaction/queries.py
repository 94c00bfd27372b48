"""Post-RoPE query states from a transformers causal LM, captured in one forward pass.

The queries are taken where the model itself hands them to its attention function: a function
registered with ``transformers.AttentionInterface`` records ``query`` and then calls the model's
own attention implementation, so the forward pass (logits, cache) is unchanged. The recording
function is installed only inside ``recording_queries`` (a context manager), which always sets the
model back to its original attention implementation, even when the forward pass raises. Nothing is
patched at import time. Works for any model whose attention goes through ``AttentionInterface``
(Llama family, SmolLM2, Qwen, Gemma 3 ... in transformers 5.x).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

CAPTURE_NAME = "kvmem_capture"


@dataclass
class _Recording:
    inner: str  # the model's own attention implementation, called after recording
    queries: dict[int, torch.Tensor]  # layer index -> [Hq, n, D]


_ACTIVE: ContextVar[_Recording | None] = ContextVar("kvmem_query_recording", default=None)


def _inner_attention(name: str, module: Any) -> Callable:
    """The attention function ``name`` resolves to for ``module`` (eager is per modeling file)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward  # the same attention, computed by SDPA
    return eager


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """Record ``query`` [1, Hq, n, D] (post-RoPE) for ``module.layer_idx``, then run the model's attention."""
    recording = _ACTIVE.get()
    if recording is None:
        raise RuntimeError(f"attention implementation {CAPTURE_NAME!r} used outside compaction.queries.recording_queries")
    if query.shape[0] != 1:
        raise ValueError(f"query capture supports batch 1, got batch {query.shape[0]}")
    recording.queries[module.layer_idx] = query[0].detach().clone()
    return _inner_attention(recording.inner, module)(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def recording_queries(model: Any) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward pass of ``model`` records its queries into the yielded dict
    (layer index -> [Hq, n, D], post-RoPE, of the last pass). The model's attention implementation
    is restored on exit."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    original = model.config._attn_implementation
    if original == CAPTURE_NAME:
        raise RuntimeError("recording_queries is not re-entrant on one model")
    AttentionInterface.register(CAPTURE_NAME, _recording_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, ALL_MASK_ATTENTION_FUNCTIONS[original])  # same masks as before
    recording = _Recording(original, {})
    token = _ACTIVE.set(recording)
    try:
        model.set_attn_implementation(CAPTURE_NAME)
        yield recording.queries
    finally:
        model.set_attn_implementation(original)
        _ACTIVE.reset(token)


@dataclass
class CapturedForward:
    """queries: per layer [Hq, T, D] post-RoPE; cache: the model's cache (keys/values [1, H, T, D]
    per layer); logits: [1, T, V]."""

    queries: list[torch.Tensor]
    cache: Any
    logits: torch.Tensor


def capture_queries(model: Any, input_ids: torch.Tensor) -> CapturedForward:
    """One forward pass (use_cache=True, no grad) over ``input_ids`` [1, T] or [T] that also returns
    the query states of every layer."""
    input_ids = input_ids.view(1, -1).to(model.device)
    with torch.no_grad(), recording_queries(model) as recorded:
        out = model(input_ids=input_ids, use_cache=True)
    layers = model.config.get_text_config().num_hidden_layers
    missing = [i for i in range(layers) if i not in recorded]
    if missing:
        raise RuntimeError(f"no queries recorded for layers {missing}: the model's attention does not go through AttentionInterface")
    return CapturedForward([recorded[i] for i in range(layers)], out.cache, out.logits)
