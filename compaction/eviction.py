"""Token-eviction baselines: each method is a score [H, T] per layer; ScorerCompactor keeps the top t.

Attention scores use logits q.k / sqrt(D) and a softmax in float32 over the keys a query sees.
Reference queries ``inputs.queries[layer]`` are [Hq, n, D] post-RoPE, Hq = H * group. With
``causal=None`` a method decides what they are: when n == T they are the context's own queries
(query i sees keys <= i), otherwise they come after the context and see every key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compaction.base import CompactionInput, register
from compaction.scorer import ScorerCompactor
from kvstore.errors import InvalidRequest


def _grouped(inputs: CompactionInput, layer: int, method: str, minimum: int = 1) -> torch.Tensor:
    """[H, g, n, D] float32 queries of each KV head's group; InvalidRequest if absent or n < minimum."""
    if inputs.queries is None:
        raise InvalidRequest(f"{method} needs reference queries (post-RoPE, per layer [Hq, n, D]); none were given")
    q = inputs.queries[layer]
    if q.shape[1] < minimum:
        raise InvalidRequest(f"{method} needs at least {minimum} reference quer{'y' if minimum == 1 else 'ies'} per head, got {q.shape[1]}")
    return q.float().view(inputs.num_heads, q.shape[0] // inputs.num_heads, q.shape[1], q.shape[2])


def _causal(causal: bool | None, n: int, total: int) -> bool:
    return n == total if causal is None else causal


def _attention(q: torch.Tensor, k: torch.Tensor, first: int | None) -> torch.Tensor:
    """Softmax attention [H, g, n, T] (float32) of queries q [H, g, n, D] over keys k [H, T, D].

    first: the key position of the first query when queries are causal (query i sees keys
    <= first + i); None when every query sees every key.
    """
    k = k.float()
    logits = torch.matmul(q, k.unsqueeze(1).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [H, g, n, T]
    if first is not None:
        n, total = q.shape[2], k.shape[1]
        future = torch.arange(total)[None, :] > (first + torch.arange(n))[:, None]  # [n, T]
        logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


@dataclass
class _Eviction(ScorerCompactor):
    """ScorerCompactor with its options validated (InvalidRequest, never assert)."""

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise InvalidRequest(f"{self.name}: sinks must be >= 0, got {self.sinks}")


@register("streaming_llm")
@dataclass
class StreamingLLM(_Eviction):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024).

    Keeps the first ``sinks`` tokens (attention sinks) and the most recent ones: score = original
    position, so the top t are the sinks plus the last t - sinks tokens (as kvpress's
    StreamingLLMPress). Needs no queries.
    """

    sinks: int = 4

    def score(self, inputs: CompactionInput, layer: int) -> torch.Tensor:
        return inputs.positions.float().repeat(inputs.num_heads, 1)  # [H, T]


@register("h2o")
@dataclass
class H2O(_Eviction):
    """H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs", NeurIPS 2023).

    score[h, j] = sum over the reference queries q of KV head h's query group of softmax(q K^T / sqrt(D))[j]:
    the accumulated attention key j receives. Causal context queries (n == T) only attend to keys
    <= their own position. Queries are processed ``chunk`` at a time (memory O(chunk * T)).
    """

    causal: bool | None = None
    chunk: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 1:
            raise InvalidRequest(f"h2o: chunk must be >= 1, got {self.chunk}")

    def score(self, inputs: CompactionInput, layer: int) -> torch.Tensor:
        q = _grouped(inputs, layer, self.name)  # [H, g, n, D]
        n = q.shape[2]
        causal = _causal(self.causal, n, inputs.num_tokens)
        total = torch.zeros(inputs.num_heads, inputs.num_tokens)
        for start in range(0, n, self.chunk):
            attn = _attention(q[:, :, start : start + self.chunk], inputs.keys[layer], start if causal else None)
            total += attn.sum(dim=(1, 2))
        return total  # [H, T]


@register("snapkv")
@dataclass
class SnapKV(_Eviction):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024), as
    kvpress's SnapKVPress.

    With the last w = ``window`` reference queries: attention softmax(q K^T / sqrt(D)) over all keys
    (causal within the window for context queries), then, for context queries, the window's own
    last w keys are cut off; the rest is averaged over the window queries, smoothed by 1-D average
    pooling (``kernel``, zero padding counted, stride 1), then averaged over the group's query
    heads. The window's own keys get score max + 1 (max over the layer's heads), so they are always
    kept. Queries after the context (n != T) score every key and protect none. For context
    queries w is at most T - 1.
    """

    window: int = 64
    kernel: int = 5
    causal: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise InvalidRequest(f"snapkv needs window >= 1 and an odd kernel, got window={self.window}, kernel={self.kernel}")

    def score(self, inputs: CompactionInput, layer: int) -> torch.Tensor:
        q = _grouped(inputs, layer, self.name)  # [H, g, n, D]
        heads, group, n, _ = q.shape
        total = inputs.num_tokens
        causal = _causal(self.causal, n, total)
        window = min(self.window, n, total - 1) if causal else min(self.window, n)
        if window < 1:
            return torch.zeros(heads, total)  # a single token: nothing to choose
        attn = _attention(q[:, :, n - window :], inputs.keys[layer], total - window if causal else None)  # [H, g, w, T]
        scored = total - window if causal else total
        scores = attn[..., :scored].mean(dim=-2)  # [H, g, T']
        scores = F.avg_pool1d(scores, kernel_size=self.kernel, padding=self.kernel // 2, stride=1).mean(dim=1)  # [H, T']
        if causal:
            scores = F.pad(scores, (0, window), value=scores.max().item() + 1)
        return scores  # [H, T]


@register("tova")
@dataclass
class TOVA(_Eviction):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024).

    score[h, j] = softmax(q_last K^T / sqrt(D))[j] averaged over the query heads of KV head h's
    group, q_last the last reference query (it sees every key: as the context's last query it is
    at position T - 1). A per-KV-head variant of the paper's rule (which averages all heads).
    """

    def score(self, inputs: CompactionInput, layer: int) -> torch.Tensor:
        q = _grouped(inputs, layer, self.name)[:, :, -1:]  # [H, g, 1, D]
        return _attention(q, inputs.keys[layer], None)[:, :, 0].mean(dim=1)  # [H, T]


@register("knorm")
@dataclass
class KNorm(_Eviction):
    """Key norm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024), as kvpress's KnormPress: score = -||k_j||_2 (float32), low-norm keys
    are kept. Needs no queries."""

    def score(self, inputs: CompactionInput, layer: int) -> torch.Tensor:
        return -torch.linalg.vector_norm(inputs.keys[layer], dim=-1, dtype=torch.float32)  # [H, T]


@register("random")
@dataclass
class Random(_Eviction):
    """Random eviction (baseline, as kvpress's RandomPress) keeping the first ``sinks`` tokens:
    scores uniform in [0, 1) from a generator seeded with (seed, layer), so identical for one seed."""

    sinks: int = 4
    seed: int = 0

    def score(self, inputs: CompactionInput, layer: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        return torch.rand(inputs.num_heads, inputs.num_tokens, generator=generator)  # [H, T]
