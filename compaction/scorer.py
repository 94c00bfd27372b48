"""Token eviction as a score plus the shared top-k: the base every eviction method builds on."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from compaction.base import CompactedLayer, CompactionInput, CompactionResult, Target


@dataclass
class ScorerCompactor:
    """Keeps, per layer and KV head, the ``t`` tokens with the highest score (in original order).

    sinks: the first ``sinks`` tokens are always kept (attention sinks), whatever their score.
    Subclasses implement ``score``.
    """

    sinks: int = 0
    name = "scorer"

    def score(self, inputs: CompactionInput, layer: int) -> torch.Tensor:
        """[H, T] importance of each cached token for each KV head (higher = keep)."""
        raise NotImplementedError

    def compact(self, inputs: CompactionInput, target: Target) -> CompactionResult:
        started = time.perf_counter()
        kept = target.tokens(inputs.num_tokens)
        layers = []
        for layer in range(inputs.num_layers):
            scores = self.score(inputs, layer).float()
            if scores.shape != (inputs.num_heads, inputs.num_tokens):
                raise ValueError(f"{self.name}: score of layer {layer} has shape {tuple(scores.shape)}, expected [H, T]")
            if self.sinks:
                scores[:, : self.sinks] = float("inf")
            indices = scores.topk(kept, dim=-1).indices.sort(dim=-1).values  # [H, t], original order
            gather = indices.unsqueeze(-1).expand(-1, -1, inputs.head_dim)
            layers.append(CompactedLayer(inputs.keys[layer].gather(1, gather), inputs.values[layer].gather(1, gather), None, indices))
        counts = torch.full((inputs.num_layers, inputs.num_heads), kept)
        return CompactionResult(self.name, layers, inputs.logical_length, counts, time.perf_counter() - started)
