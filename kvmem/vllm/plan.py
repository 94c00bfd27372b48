"""Scheduler-side bookkeeping of the kvmem connector: what to load and what to save, per step.

Pure Python (no vLLM import), so every rule here is unit-tested without an engine. The
connector's scheduler half owns one ``RequestState`` per request it takes part in and turns
each scheduler step into ``LoadJob``s and ``SaveJob``s, which travel to the worker half in the
step's connector metadata (plain lists of ints: picklable across processes).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Sequence


def loadable_tokens(matched: int, prompt_len: int, block_size: int) -> int:
    """Tokens of a prompt vLLM may take from kvmem: the stored prefix cut to whole vLLM blocks,
    leaving at least one prompt token to compute (its logits start the answer)."""
    if prompt_len <= 1 or matched <= 0:
        return 0
    return (min(matched, prompt_len - 1) // block_size) * block_size


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class LoadJob:
    """Write tokens [start, end) of ``token_ids`` (the request's first ``end`` tokens) from
    kvmem's stored prefix into the request's blocks."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int


@dataclass
class SaveJob:
    """Copy tokens [start, end) out of the request's blocks and save ``token_ids`` (tokens
    [0, end)) as ``session_id``, kvmem sharing the stored tokens [0, start)."""

    req_id: str
    session_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int


@dataclass
class StepPlan:
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)


@dataclass
class RequestState:
    """One request kvmem takes part in.

    stored:      leading tokens kvmem holds for this request (its Lookup, then our own saves)
    session_end: tokens the request's session holds (0 until its first save)
    computed:    tokens whose KV sits in the request's blocks after the step being planned
    local_computed: tokens vLLM's own prefix cache supplied (a load starts after them)
    loaded:      tokens planned to come from kvmem (a failed load is recomputed by vLLM)
    """

    req_id: str
    num_prompt: int
    session_id: str
    named: bool
    chunk_tokens: int
    stored: int = 0
    save: bool = True
    block_ids: list[int] = field(default_factory=list)
    local_computed: int = 0
    pending_load: tuple[int, int] | None = None
    loaded: int = 0
    session_end: int = 0
    computed: int = 0

    @classmethod
    def create(cls, req_id: str, num_prompt: int, session: str, chunk_tokens: int, stored: int, save: bool) -> "RequestState":
        return cls(req_id, num_prompt, session or f"vllm-{uuid.uuid4().hex}", bool(session), max(1, chunk_tokens), stored, save)

    def update_blocks(self, new_block_ids: Sequence[int] | None, replace: bool) -> None:
        """New blocks of a step: appended, or the whole list for a request resumed after preemption."""
        if replace:
            self.block_ids = list(new_block_ids or [])
        elif new_block_ids:
            self.block_ids.extend(new_block_ids)

    def take_load(self, token_ids: Sequence[int], block_size: int) -> LoadJob | None:
        if self.pending_load is None:
            return None
        start, end = self.pending_load
        self.pending_load = None
        self.loaded += end - start
        return LoadJob(self.req_id, list(token_ids[:end]), self.block_ids[: blocks_for(end, block_size)], start, end)

    def take_save(self, token_ids: Sequence[int], block_size: int) -> SaveJob | None:
        """A save of the full blocks computed so far, once the prompt is done and when a block
        fills during decoding; only what kvmem lacks is copied (from the stored prefix, cut to
        kvmem's chunk size); nothing when kvmem already holds it all (an unnamed request) or the
        session already holds it (a named one)."""
        if not self.save or self.computed < self.num_prompt:
            return None
        full_end = (min(self.computed, len(token_ids)) // block_size) * block_size
        have = self.session_end if self.named else self.stored
        if full_end <= 0 or full_end <= have or full_end > len(self.block_ids) * block_size:
            return None
        start = (min(self.stored, full_end - 1) // self.chunk_tokens) * self.chunk_tokens
        self.stored = max(self.stored, full_end)
        self.session_end = full_end
        return SaveJob(self.req_id, self.session_id, list(token_ids[:full_end]), self.block_ids[: blocks_for(full_end, block_size)], start, full_end)
