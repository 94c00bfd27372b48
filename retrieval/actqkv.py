"""Probe queries and per-layer budgets for KV-block retrieval (ActQKV, arXiv 2502.13542).

A query window (the question, or the tokens being decoded) gives per layer its query states
Q [Hq, n, D]. One *probe* per KV head stands in for the window:

* ``actqkv``: each token is weighted by its activation bias, how far its query deviates from the
  per-channel statistics of the window (mean, variance): ``mean_c (q - mu)^2 / (var + mean(var)/100)``.
  Tokens whose queries stand out (the key, the asked-for entity) dominate the probe; the template
  tokens every question shares do not.
* ``mean``: all tokens equally (the plain mean query of the window).
* ``last``: the last token only (what a decode step would use).

Query heads are pooled over their KV group (mean), and the probe is rotated back to position 0 so
it compares with the position-free block representatives of retrieval/block_index.py.

Dynamic cut-off: a total token budget is spread over layers by the normalised entropy of each
layer's block scores (softmax at a temperature): a layer whose scores single out a few blocks
(low entropy) needs fewer, a layer whose scores are flat (high entropy) gets more, within bounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvstore.errors import InvalidRequest

METHODS = ("actqkv", "mean", "last")


def token_weights(queries: torch.Tensor, method: str) -> torch.Tensor:
    """Weights [..., n] summing to 1 for queries [..., Hq, n, D] (one layer, or layers stacked
    in front: each weighted on its own)."""
    if method not in METHODS:
        raise InvalidRequest(f"unknown probe method {method!r}; use one of {', '.join(METHODS)}")
    lead, n = queries.shape[:-3], queries.shape[-2]
    if method == "last" or n == 1:
        weights = torch.zeros(*lead, n)
        weights[..., -1] = 1.0
        return weights
    if method == "mean":
        return torch.full((*lead, n), 1.0 / n)
    q = queries.float()
    squares = (q - q.mean(dim=-2, keepdim=True)).pow(2)  # [..., Hq, n, D]
    var = squares.mean(dim=-2, keepdim=True)  # [..., Hq, 1, D] (torch's var over this dim is ~20x slower)
    deviation = squares / (var + var.mean(dim=(-3, -2, -1), keepdim=True) / 100)  # [..., Hq, n, D]
    score = deviation.mean(dim=(-3, -1))  # [..., n]
    return score / score.sum(dim=-1, keepdim=True).clamp(min=1e-12)


@dataclass
class Probe:
    """What one layer searches with: vectors [H_kv, n, D] (position-free) and weights [n] summing to 1.

    A block scores sum_i weights[i] * (best cosine between vector i and the block's keys), averaged
    over KV heads: each probe token finds its own match (late interaction), so a question whose
    rare words ("falcon") occur in one block ranks that block first even when most of the question
    is template.
    """

    vectors: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_states(cls, states: torch.Tensor, kv_heads: int, method: str) -> "Probe":
        """From position-free query or key states [Hs, n, D] of one layer (Hs: a multiple of
        kv_heads; query heads are pooled over their KV group)."""
        return _probes(states[None], kv_heads, method)[0]


def probes_for_layers(states: list[torch.Tensor], kv_heads: int, method: str) -> list[Probe]:
    """``Probe.from_states`` for every layer's states [Hs, n, D] at once (one batched pass when the
    layers agree in shape, as a request's query vectors do; layer by layer otherwise)."""
    if len(states) < 2 or any(s.shape != states[0].shape for s in states):
        return [Probe.from_states(s, kv_heads, method) for s in states]
    return _probes(torch.stack(states), kv_heads, method)


def _probes(states: torch.Tensor, kv_heads: int, method: str) -> list[Probe]:
    """One Probe per layer of states [L, Hs, n, D]: weights per layer, query heads pooled over
    their KV group, zero-weight tokens dropped."""
    layers, heads, n, dim = states.shape
    if n == 0:
        raise InvalidRequest("a probe needs at least one token")
    if heads % kv_heads:
        raise InvalidRequest(f"{heads} heads do not group into {kv_heads} KV heads")
    weights = token_weights(states, method)  # [L, n]
    vectors = states.float().view(layers, kv_heads, heads // kv_heads, n, dim).mean(2)  # [L, H_kv, n, D]
    probes = []
    for layer in range(layers):
        keep = weights[layer] > 0
        probes.append(Probe(vectors[layer][:, keep], weights[layer][keep] / weights[layer][keep].sum()))
    return probes


def normalised_entropy(scores: np.ndarray, temperature: float) -> float:
    """Entropy of softmax(scores / temperature) divided by log(len): 0 = one block, 1 = flat."""
    if len(scores) < 2:
        return 0.0
    z = scores.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return float(-(p * np.log(p + 1e-30)).sum() / np.log(len(scores)))


@dataclass(frozen=True)
class BudgetSpread:
    min_share: float = 0.25  # a layer gets at least this fraction of the mean per-layer budget
    max_share: float = 2.0  # and at most this multiple of it
    temperature: float = 0.05  # softmax temperature on cosine scores for the entropy

    def cap(self, mean_blocks: float, available: int) -> int:
        """Most blocks any layer may get."""
        return max(1, min(available, int(np.ceil(self.max_share * mean_blocks))))

    def spread(self, entropies: list[float], total_blocks: int, available: int) -> list[int]:
        """Blocks per layer: proportional to entropy, within [min_share, max_share] x the mean,
        summing to ``total_blocks`` (or every layer's cap when that is less); ``available``
        bounds each layer (the retrievable blocks)."""
        layers = len(entropies)
        if layers == 0 or total_blocks <= 0:
            return [0] * layers
        mean = total_blocks / layers
        low, high = int(np.floor(self.min_share * mean)), self.cap(mean, available)
        low = min(low, high)
        weights = np.asarray(entropies, dtype=np.float64) + 1e-3
        raw = np.clip(total_blocks * weights / weights.sum(), low, high)
        # water-fill: rescale the layers not pinned at a bound until the sum matches
        for _ in range(50):
            free = (raw > low) & (raw < high)
            gap = total_blocks - raw.sum()
            if abs(gap) < 0.5 or not free.any():
                break
            raw[free] += gap * weights[free] / weights[free].sum()
            raw = np.clip(raw, low, high)
        blocks = np.floor(raw).astype(int)
        # hand out what flooring lost to the layers with the largest remainders
        short = min(total_blocks, high * layers) - blocks.sum()
        for i in np.argsort(-(raw - blocks)):
            if short <= 0:
                break
            if blocks[i] < high:
                blocks[i] += 1
                short -= 1
        return blocks.tolist()
