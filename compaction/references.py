"""Reference queries from the model itself (query-agnostic: no future question is seen).

* self-study: the model continues the context by itself (``self_study`` sampled tokens, seeded);
  the queries of that continuation are what it asks of the context while generating from it;
* recent context queries: the context's own last ``window`` queries, added ``window_weight``
  times (a weight, by repetition): what the model asks right where generation resumes;
* repeat-prefill (optional): an instruction to repeat the context, then the context again; the
  queries of the repeated tokens see every context key.

All come from one forward pass (context, continuation[, instruction, repeat]) with queries
captured post-RoPE. The last 20% of the continuation (and of the repeat) are held out to measure
quality. Measured on SmolLM2 (768-token real context, 10% kept, relative attention error on the
true continuation's queries / continuation NLL; full cache NLL 2.59):
repeat + window 0.28 / 3.17, self-study + window 0.21 / 3.03, self-study + repeat + window
0.25 / 3.18; SnapKV 0.31 / 2.68 (tests/test_attention_matching.py, docs/compaction.md).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

REPEAT_PROMPT = "\n\nRepeat the text above exactly.\n\n"


@dataclass
class References:
    """queries, held_out: per layer [Hq, n, D] post-RoPE."""

    queries: list[torch.Tensor]
    held_out: list[torch.Tensor]
    continuation_tokens: int
    repeated_tokens: int


def _split(q: torch.Tensor, start: int, end: int, held_out_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    cut = start + int(round((end - start) * (1 - held_out_fraction)))
    return q[:, start:cut], q[:, cut:end]


def reference_queries(
    model, tokenizer, context_ids: torch.Tensor, *, self_study: int = 128, use_repeat: bool = False, max_repeat: int = 2048,
    window: int = 128, window_weight: int = 4, held_out_fraction: float = 0.2, seed: int = 0,
) -> References:
    """Reference and held-out queries for compacting ``context_ids`` [1, T] (see the module doc)."""
    from compaction.queries import capture_queries

    context_ids = context_ids.view(1, -1)
    total = context_ids.shape[1]
    limit = getattr(model.config, "max_position_embeddings", 0) or 1 << 30
    continuation = context_ids[:, :0]
    self_study = max(0, min(self_study, limit - total - 1))
    if self_study:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            generated = model.generate(context_ids, max_new_tokens=self_study, do_sample=True, top_p=0.9, temperature=0.8, pad_token_id=tokenizer.eos_token_id)
        continuation = generated[:, total:]
    parts = [context_ids, continuation]
    prompt_len = repeat = 0
    if use_repeat or not continuation.shape[1]:
        prompt = tokenizer(REPEAT_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
        prompt_len = prompt.shape[1]
        repeat = max(0, min(total, max_repeat, limit - total - continuation.shape[1] - prompt_len))
        parts += [prompt, context_ids[:, :repeat]]
    with torch.no_grad():
        captured = capture_queries(model, torch.cat(parts, dim=1))
    recent = min(window, total)
    study_end = total + continuation.shape[1]
    repeat_start = study_end + prompt_len
    queries, held_out = [], []
    for q in captured.queries:
        fit_parts, hold_parts = [], []
        for start, end in ((total, study_end), (repeat_start, repeat_start + repeat)):
            if end > start:
                fit, hold = _split(q, start, end, held_out_fraction)
                fit_parts.append(fit)
                hold_parts.append(hold)
        queries.append(torch.cat(fit_parts + [q[:, total - recent : total]] * window_weight, dim=1).contiguous())
        held_out.append(torch.cat(hold_parts, dim=1).contiguous())
    return References(queries, held_out, continuation.shape[1], repeat)


def repeat_prefill_queries(model, tokenizer, context_ids: torch.Tensor, max_repeat: int = 2048) -> References:
    """Repeat-prefill and recent-window references only (no self-study): the first variant measured."""
    return reference_queries(model, tokenizer, context_ids, self_study=0, use_repeat=True, max_repeat=max_repeat)


class ReferenceCache:
    """Reference queries the hosted model made for a session, kept in memory for the next
    compaction of the same session (another method, another ratio): making them prefills and
    generates (18-20 s at 1k tokens here), and they depend only on the session's tokens and the
    model. Keys name the session generation (``version``, ``created_at_ms``) and the model's spec
    digest, so an appended or replaced session, or another model, never gets stale queries.
    Least recently used entries go first once ``max_bytes`` is exceeded; 0 disables the cache.
    ``get`` hands out copies: a compactor may change its inputs in place."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(record: Any, model_digest: bytes) -> tuple:
        return (record.tenant, record.session_id, record.version, record.created_at_ms, model_digest)

    def get_or_make(self, key: tuple, make: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if entry is not None:
            return [q.clone() for q in entry[0]], [q.clone() for q in entry[1]]
        queries, held_out = make()
        size = sum(q.nbytes for q in queries) + sum(q.nbytes for q in held_out)
        with self._lock:
            self.misses += 1
            if 0 < size <= self.max_bytes and key not in self._entries:
                self._entries[key] = ([q.clone() for q in queries], [q.clone() for q in held_out], size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, _, dropped) = self._entries.popitem(last=False)
                    self._bytes -= dropped
        return queries, held_out

    @property
    def bytes(self) -> int:
        return self._bytes
