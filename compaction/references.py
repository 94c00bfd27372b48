"""Reference queries from the model itself: repeat-prefill.

The model reads the context, then an instruction to repeat it, then the context again; the queries
of the repeated tokens are what a model "asks" of the context when it has to reproduce it, and
they see every context key. They are captured post-RoPE in one forward pass. The first 80% of the
repeated tokens are the reference queries, the last 20% are held out for measuring quality.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

REPEAT_PROMPT = "\n\nRepeat the text above exactly.\n\n"


@dataclass
class References:
    """queries, held_out: per layer [Hq, n, D] post-RoPE; cache: the context's own KV (DynamicCache)."""

    queries: list[torch.Tensor]
    held_out: list[torch.Tensor]
    repeated_tokens: int


def repeat_prefill_queries(model, tokenizer, context_ids: torch.Tensor, max_repeat: int = 2048, held_out_fraction: float = 0.2) -> References:
    """Queries of a repeat of (up to the first ``max_repeat`` tokens of) the context.

    context_ids: [1, T]. The repeat is shortened to fit the model's window.
    """
    from compaction.queries import capture_queries

    context_ids = context_ids.view(1, -1)
    total = context_ids.shape[1]
    prompt = tokenizer(REPEAT_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    window = getattr(model.config, "max_position_embeddings", 0) or (2 * total + prompt.shape[1])
    repeat = max(8, min(total, max_repeat, window - total - prompt.shape[1]))
    ids = torch.cat([context_ids, prompt, context_ids[:, :repeat]], dim=1)
    with torch.no_grad():
        captured = capture_queries(model, ids)
    start = total + prompt.shape[1]
    split = start + int(round(repeat * (1 - held_out_fraction)))
    queries = [q[:, start:split].contiguous() for q in captured.queries]
    held_out = [q[:, split:].contiguous() for q in captured.queries]
    return References(queries, held_out, repeat)
