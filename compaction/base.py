"""The compactor interface: a target, the input a compactor sees, what it returns, a registry.

A compactor is a small dataclass with one method, ``compact(inputs, target) -> CompactionResult``.
Every method works per layer and per KV head. A result may keep a different number of keys per
head (non-uniform budgets); layers are then padded to a common slot count, padded slots carry a
bias of -inf so attention never sees them, and ``kept`` records the real count per head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from kvstore.errors import InvalidRequest

PAD_BIAS = float("-inf")


@dataclass(frozen=True)
class Target:
    """How much to keep: a kept ratio in (0, 1] or a token budget (per head, on average)."""

    ratio: float | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.budget is None):
            raise InvalidRequest("give exactly one of a kept ratio or a token budget")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):  # NaN fails this too
            raise InvalidRequest(f"kept ratio must be in (0, 1], got {self.ratio}")
        if self.budget is not None and self.budget < 1:
            raise InvalidRequest(f"token budget must be at least 1, got {self.budget}")

    def tokens(self, total: int) -> int:
        """Kept tokens per head for a context of ``total`` tokens (at least 1)."""
        if self.budget is not None:
            if self.budget > total:
                raise InvalidRequest(f"token budget {self.budget} is larger than the session ({total} tokens)")
            return self.budget
        return max(1, min(total, round(self.ratio * total)))


@dataclass
class CompactionInput:
    """A full cache and what compactors may use.

    keys, values: per layer [H, T, D] (post-RoPE, as the model stores them)
    queries:      per layer [Hq, n, D] post-RoPE reference queries, or None; Hq = H * group
    held_out:     per layer [Hq, m, D] queries kept aside for measuring quality, or None
    positions:    [T] original positions of the cached tokens
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor] | None = None
    held_out: list[torch.Tensor] | None = None
    positions: torch.Tensor | None = None
    logical_length: int = 0

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise InvalidRequest("a cache needs the same number of key and value layers (at least one)")
        shape = self.keys[0].shape
        for index, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.dim() != 3 or k.shape != v.shape or k.shape != shape:
                raise InvalidRequest(f"layer {index}: keys {tuple(k.shape)} / values {tuple(v.shape)} must all be [H, T, D] of one shape")
        for name in ("queries", "held_out"):
            queries = getattr(self, name)
            if queries is None:
                continue
            if len(queries) != len(self.keys):
                raise InvalidRequest(f"{name}: {len(queries)} layers of queries for {len(self.keys)} layers of keys")
            for index, q in enumerate(queries):
                if q.dim() != 3 or q.shape[2] != shape[2] or q.shape[0] % shape[0]:
                    raise InvalidRequest(f"{name}, layer {index}: queries {tuple(q.shape)} must be [Hq, n, D={shape[2]}] with Hq a multiple of H={shape[0]}")
                if not torch.isfinite(q).all():
                    raise InvalidRequest(f"{name}, layer {index}: queries contain NaN or Inf")
        if self.positions is None:
            self.positions = torch.arange(self.num_tokens)
        if not self.logical_length:
            self.logical_length = int(self.positions.max()) + 1 if self.num_tokens else 0

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_heads(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[2]

    def grouped_queries(self, layer: int, which: str = "queries") -> torch.Tensor | None:
        """[H, group * n, D]: the reference queries of each KV head's query group, pooled."""
        queries = getattr(self, which)
        if queries is None:
            return None
        q = queries[layer]
        group = q.shape[0] // self.num_heads
        return q.reshape(self.num_heads, group * q.shape[1], q.shape[2])


@dataclass
class CompactedLayer:
    """keys/values [H, t, D]; bias [H, t] float32 or None; indices [H, t] original token index (-1 = padding)."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None
    indices: torch.Tensor


@dataclass
class CompactionResult:
    method: str
    layers: list[CompactedLayer]
    logical_length: int
    kept: torch.Tensor  # [L, H] real (unpadded) keys per head
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def slots(self) -> int:
        """Stored slots per head (t, the padded length)."""
        return int(self.layers[0].keys.shape[1])

    @property
    def has_bias(self) -> bool:
        return any(layer.bias is not None for layer in self.layers)


class Compactor(Protocol):
    name: str

    def compact(self, inputs: CompactionInput, target: Target) -> CompactionResult: ...


REGISTRY: dict[str, Callable[..., Compactor]] = {}


def register(name: str):
    """Class decorator: make a compactor available by name."""

    def wrap(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def available_methods() -> list[str]:
    """Names of every registered compaction method."""
    import compaction.registry  # noqa: F401 - imports every method module so that each registers

    return sorted(REGISTRY)


def make_compactor(name: str, **options) -> Compactor:
    """The compactor registered under ``name``; InvalidRequest naming the known ones otherwise."""
    import compaction.registry  # noqa: F401 - imports every method module so that each registers

    if name not in REGISTRY:
        raise InvalidRequest(f"unknown compaction method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](**options)
    except TypeError as exc:
        raise InvalidRequest(f"bad options for {name!r}: {exc}") from None


def pad_layer(keys: list[torch.Tensor], values: list[torch.Tensor], bias: list[torch.Tensor | None], indices: list[torch.Tensor]) -> CompactedLayer:
    """Stack per-head selections of different lengths into [H, t_max, ...], padding with masked slots.

    keys[h], values[h]: [t_h, D]; bias[h]: [t_h] or None; indices[h]: [t_h]
    """
    slots = max(k.shape[0] for k in keys)
    heads, dim = len(keys), keys[0].shape[1]
    any_bias = any(b is not None for b in bias) or any(k.shape[0] != slots for k in keys)
    out_k = keys[0].new_zeros(heads, slots, dim)
    out_v = values[0].new_zeros(heads, slots, dim)
    out_b = torch.full((heads, slots), PAD_BIAS, dtype=torch.float32) if any_bias else None
    out_i = torch.full((heads, slots), -1, dtype=torch.long)
    for h in range(heads):
        n = keys[h].shape[0]
        out_k[h, :n], out_v[h, :n], out_i[h, :n] = keys[h], values[h], indices[h]
        if out_b is not None:
            out_b[h, :n] = bias[h].float() if bias[h] is not None else 0.0
    return CompactedLayer(out_k, out_v, out_b, out_i)


def pad_layers(layers: list[CompactedLayer]) -> list[CompactedLayer]:
    """Pad every layer to the largest slot count (the store keeps one token count per session)."""
    slots = max(layer.keys.shape[1] for layer in layers)
    out = []
    for layer in layers:
        extra = slots - layer.keys.shape[1]
        if extra == 0 and (layer.bias is not None or all(l.bias is None and l.keys.shape[1] == slots for l in layers)):
            out.append(layer)
            continue
        heads, _, dim = layer.keys.shape
        bias = layer.bias if layer.bias is not None else torch.zeros(heads, layer.keys.shape[1])
        out.append(CompactedLayer(
            torch.cat([layer.keys, layer.keys.new_zeros(heads, extra, dim)], 1),
            torch.cat([layer.values, layer.values.new_zeros(heads, extra, dim)], 1),
            torch.cat([bias, torch.full((heads, extra), PAD_BIAS)], 1),
            torch.cat([layer.indices, torch.full((heads, extra), -1, dtype=torch.long)], 1),
        ))
    return out
