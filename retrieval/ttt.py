"""Query-only test-time training (qTTT, arXiv 2512.13898) over a frozen KV cache.

One prefill gives the context's keys and values [H_kv, T, D] per layer; they stay frozen. A
*shadow* of the hosted model shares every weight with it except the attention query projections,
which are copies. The shadow is trained for ``steps`` AdamW steps (gradient norm clipped): each step
takes a random ``span_tokens``-token span [s, s + k) of the context, runs it through the shadow with
the frozen cache of the first s tokens in front of it, and minimises the next-token loss on the
span. The span's own keys and values are taken from the frozen cache as well (``FrozenSpanCache``),
so gradients reach the model only through queries, and one prefill serves every step. The shadow
then answers from the frozen cache.

The hosted model is never written: concurrent requests each train their own shadow and cannot see
each other's updates, and ``query_weights_digest`` before and after proves the weights unchanged.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import xxhash

from kvstore.errors import FailedPrecondition, InvalidRequest

QUERY_PROJECTION = "q_proj"


@dataclass(frozen=True)
class TTTConfig:
    """qTTT settings. Defaults measured with ``python -m bench.ttt_sweep`` (docs/planner.md)."""

    steps: int = 8
    span_tokens: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise InvalidRequest(f"ttt steps must be >= 0, got {self.steps}")
        if self.span_tokens < 2:
            raise InvalidRequest(f"ttt span_tokens must be >= 2, got {self.span_tokens}")
        if not self.learning_rate > 0:
            raise InvalidRequest(f"ttt learning_rate must be > 0, got {self.learning_rate}")
        if not self.max_grad_norm > 0:
            raise InvalidRequest(f"ttt max_grad_norm must be > 0, got {self.max_grad_norm}")


def _is_query(name: str) -> bool:
    return f".{QUERY_PROJECTION}." in f".{name}"


def query_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if _is_query(n)]
    if not named:
        raise FailedPrecondition(f"test-time training updates the attention query projections ({QUERY_PROJECTION}); {type(model).__name__} has none")
    return named


def query_weights_digest(model: Any) -> str:
    """xxh3-128 of every query-projection tensor's bytes, in name order."""
    digest = xxhash.xxh3_128()
    for name, param in sorted(query_parameters(model), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def query_shadow(model: Any) -> tuple[Any, list[torch.nn.Parameter]]:
    """A copy of ``model`` that shares every tensor with it except the query projections (fresh
    copies, trainable). Shared weights are wrapped as frozen Parameters over the same storage, so
    nothing about the hosted model (values or requires_grad flags) changes."""
    memo: dict[int, Any] = {}
    for name, param in model.named_parameters():
        if not _is_query(name):
            memo[id(param)] = torch.nn.Parameter(param.detach(), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    shadow = copy.deepcopy(model, memo)
    trainable = [p for _, p in query_parameters(shadow)]
    for param in trainable:
        param.requires_grad_(True)
    return shadow, trainable


def _dynamic_cache_class():
    from transformers import DynamicCache

    return DynamicCache


class FrozenSpanCache(_dynamic_cache_class()):
    """A cache over the first ``start`` context tokens whose ``update`` hands back the frozen keys
    and values [1, H, start + n, D] of the context itself instead of appending the freshly computed
    ones: the span attends to exactly the prefill's states, and no gradient flows into them."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], start: int, config: Any):
        from kvmem.hf_cache import layers_to_cache

        super().__init__(config=config)
        self.layers = layers_to_cache([(k[:, :start], v[:, :start]) for k, v in zip(keys, values)], config).layers
        self.frozen = list(zip(keys, values))
        self.start = start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        end = self.start + key_states.shape[-2]
        keys, values = self.frozen[layer_idx]
        return keys[None, :, :end], values[None, :, :end]


@dataclass
class TTTReport:
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss per step (before its update)
    seconds: float = 0.0
    weights_unchanged: bool = True  # hosted model's query weights bit-identical afterwards


def span_starts(num_tokens: int, config: TTTConfig) -> list[int]:
    """Seeded span starts in [1, T - k - 1]: every span has a non-empty frozen prefix and a next
    token for its last position."""
    k = min(config.span_tokens, num_tokens - 2)
    if k < 1:
        raise InvalidRequest(f"test-time training needs a context of at least 3 tokens, got {num_tokens}")
    generator = torch.Generator().manual_seed(config.seed)
    high = num_tokens - k  # exclusive upper bound for s
    return torch.randint(1, max(2, high), (config.steps,), generator=generator).tolist()


def span_loss(shadow: Any, context_ids: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], start: int, span: int) -> torch.Tensor:
    """Next-token loss of context_ids[start : start + span] (targets shifted by one) attending to
    the frozen cache. context_ids [T]; keys/values per layer [H, T, D]."""
    end = min(start + span, context_ids.numel() - 1)
    cache = FrozenSpanCache(keys, values, start, shadow.config)
    inputs = context_ids[start:end].view(1, -1)
    logits = shadow(input_ids=inputs, cache=cache, use_cache=True).logits[0]  # [n, vocab]
    return F.cross_entropy(logits.float(), context_ids[start + 1 : end + 1])


def adapt(model: Any, context_ids: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], config: TTTConfig) -> tuple[Any, TTTReport]:
    """Train a query shadow of ``model`` on the context. Returns (shadow, report).

    context_ids [T]; keys, values: per layer [H_kv, T, D], the frozen prefill of context_ids.
    """
    num_tokens = context_ids.numel()
    if any(k.shape[1] != num_tokens for k in keys):
        raise InvalidRequest(f"frozen cache holds {keys[0].shape[1]} tokens, the context {num_tokens}")
    started = time.perf_counter()
    before = query_weights_digest(model)
    shadow, trainable = query_shadow(model)
    shadow.train(False)  # no dropout: the loss is deterministic given the span
    report = TTTReport(config.steps)
    if config.steps:
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        device = next(model.parameters()).device
        context_ids = context_ids.to(device)
        frozen_k = [k.detach().to(device) for k in keys]
        frozen_v = [v.detach().to(device) for v in values]
        for start in span_starts(num_tokens, config):
            with torch.enable_grad():
                loss = span_loss(shadow, context_ids, frozen_k, frozen_v, start, config.span_tokens)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            report.losses.append(float(loss.detach()))
    for param in trainable:
        param.requires_grad_(False)
    report.weights_unchanged = query_weights_digest(model) == before
    if not report.weights_unchanged:  # cannot happen unless shared storage was written
        raise RuntimeError("test-time training changed the hosted model's query weights")
    report.seconds = time.perf_counter() - started
    return shadow, report


def heldout_loss(model: Any, context_ids: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], starts: Sequence[int], span: int) -> float:
    """Mean next-token loss of ``model`` on spans at ``starts`` over the frozen cache (no grad)."""
    with torch.no_grad():
        return float(torch.stack([span_loss(model, context_ids, keys, values, s, span) for s in starts]).mean())
