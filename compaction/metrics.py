"""Quality of a compacted cache: how well its attention reproduces the full cache's."""
from __future__ import annotations

import math

import torch

from compaction.base import CompactionInput, CompactionResult


def compacted_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for one head: q [n, D], keys/values [t, D], bias [t] -> [n, D]."""
    logits = (q @ keys.T) * scale
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1) @ values


def attention_output_errors(inputs: CompactionInput, result: CompactionResult, which: str = "held_out") -> torch.Tensor:
    """[L, H] relative L2 error ||O_compact - O_full|| / ||O_full|| of the attention outputs for
    queries that come after the context (they see every key), pooled over each group's heads."""
    errors = torch.zeros(inputs.num_layers, inputs.num_heads)
    scale = 1.0 / math.sqrt(inputs.head_dim)
    for layer in range(inputs.num_layers):
        queries = inputs.grouped_queries(layer, which).float()
        compacted = result.layers[layer]
        for h in range(inputs.num_heads):
            q = queries[h]
            full = compacted_attention(q, inputs.keys[layer][h].float(), inputs.values[layer][h].float(), None, scale)
            bias = compacted.bias[h] if compacted.bias is not None else None
            approx = compacted_attention(q, compacted.keys[h].float(), compacted.values[h].float(), bias, scale)
            errors[layer, h] = (approx - full).norm() / full.norm().clamp_min(1e-12)
    return errors


def mean_attention_error(inputs: CompactionInput, result: CompactionResult, which: str = "held_out") -> float:
    """Relative attention-output error averaged over layers and KV heads."""
    return float(attention_output_errors(inputs, result, which).mean())
