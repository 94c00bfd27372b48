"""Compacting stored sessions: load the full cache, get reference queries, compact, store atomically."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compaction.base import CompactionInput, Target, make_compactor
from compaction.metrics import mean_attention_error
from compaction.naming import COMPACTION_LABEL, SOURCE_SUFFIX, compacted_id
from compaction.slots import SLOTS_AUX, slots_to_bytes
from kvstore.errors import Conflict, FailedPrecondition, InvalidRequest
from modelhost.host import ModelHost
from kvstore.records import SessionRecord
from kvstore.store import SessionStore

QUERY_METHODS_WITHOUT_HOST = ("streaming_llm", "knorm", "random")  # need no queries at all


@dataclass(frozen=True)
class CompactReport:
    record: SessionRecord
    method: str
    kept_tokens: float
    slots: int
    bytes_before: int
    bytes_after: int
    seconds: float
    heldout_attention_error: float  # -1 when no held-out queries


def default_target_id(session_id: str, method: str, target: Target, options: dict | None = None) -> str:
    return compacted_id(session_id, method, target.ratio, target.budget, options)


def load_layers(store: SessionStore, tenant: str, session_id: str) -> tuple[SessionRecord, list[torch.Tensor], list[torch.Tensor]]:
    """The stored session and its per-layer keys, values [H, T, D]."""
    plan = store.restore(tenant, session_id)
    keys, values, _ = plan.tensors()
    return plan.record, keys, values


def compact_session(
    store: SessionStore,
    host: ModelHost | None,
    tenant: str,
    session_id: str,
    method: str,
    target: Target,
    *,
    target_session_id: str = "",
    replace: bool = False,
    queries: list[torch.Tensor] | None = None,
    held_out: list[torch.Tensor] | None = None,
    options: dict | None = None,
    references: Any = None,
    overwrite: bool = False,
    drop_source: bool = False,
    name_options: dict | None = None,
) -> CompactReport:
    """Compact a stored session and store the result (beside it, or replacing it).

    The compacted session names its lossless original in its labels ("source", "source_version"),
    so exact KV can be recalled from it. ``replace`` stores the result under ``session_id`` and
    keeps the original as ``<session_id>@source`` (a copy-on-write fork: no KV is copied; its
    blocks stay on disk and leave the memory tiers as they age), unless ``drop_source``.
    ``overwrite`` replaces an existing target (else AlreadyExists). ``references``: a
    compaction.references.ReferenceCache for the queries the hosted model makes.
    ``name_options``: the options as the caller spelled them (the RPC's strings), for the default
    target id, so a client computes the same id (``compaction.naming.compacted_id``)."""
    started = time.perf_counter()
    compactor = make_compactor(method, **(options or {}))
    record = store.get(tenant, session_id)
    if record.has_bias or COMPACTION_LABEL in record.labels or record.logical_length != record.num_tokens:
        used = record.labels.get(COMPACTION_LABEL, "an unknown method")
        raise FailedPrecondition(f"session {session_id!r} is already compacted (with {used}); compact the original session with {method!r} instead")
    target.tokens(record.num_tokens)  # validates the budget against the session length
    if not replace and target_session_id == session_id:
        raise InvalidRequest(f"the target is session {session_id!r} itself: compact it with replace=true, which keeps the "
                             f"original as {session_id + SOURCE_SUFFIX!r}")
    _, keys, values = load_layers(store, tenant, session_id)
    if queries is None and method not in QUERY_METHODS_WITHOUT_HOST:
        queries, held_out = _host_queries(host, record, method, references)
    inputs = CompactionInput(keys, values, queries, held_out, torch.arange(record.num_tokens), record.num_tokens)
    result = compactor.compact(inputs, target)
    error = mean_attention_error(inputs, result) if held_out is not None else -1.0

    slots = result.slots
    first = result.layers[0].indices[0]
    kept_index = first.clamp_min(0).numpy()
    pieces = store.new_pieces(record.spec, 0, slots, has_bias=True)
    for layer, compacted in enumerate(result.layers):
        bias = compacted.bias if compacted.bias is not None else torch.zeros(compacted.keys.shape[:2])
        pieces.add_tensors(layer, 0, compacted.keys.contiguous(), compacted.values.contiguous(), bias.contiguous())
    source_id, source_version, source_created = session_id, record.version, record.created_at_ms
    if replace:  # the original first (exactly the tokens compacted), so nothing is lost if the replace fails
        source_id, source_version, source_created = "", 0, 0
        if not drop_source:
            source_id = session_id + SOURCE_SUFFIX
            kept = store.fork(tenant, session_id, source_id, at_token=record.num_tokens, overwrite=True).record
            source_version, source_created = kept.version, kept.created_at_ms
    labels = {
        COMPACTION_LABEL: method,
        "source": source_id,
        "source_version": str(source_version) if source_id else "",
        "source_created_ms": str(source_created) if source_id else "",  # with the version: the source's generation (an overwrite restarts versions)
        "ratio": f"{result.kept.float().mean().item() / record.num_tokens:.6f}",
        "kept_per_head": f"{result.kept.float().mean().item():.2f}",
        "slots": str(slots),
    }
    destination = session_id if replace else (target_session_id or default_target_id(session_id, method, target, options if name_options is None else name_options))
    saved = store.save(
        tenant, destination, record.spec, record.token_ids[kept_index], pieces,
        positions=np.asarray(kept_index, dtype=np.int64), logical_length=record.num_tokens, overwrite=replace or overwrite, labels=labels,
    )
    try:  # which original token each slot is, for recall's double-count handling (derived data: a lost race only weakens it)
        store.put_aux(tenant, destination, {SLOTS_AUX: slots_to_bytes([layer.indices for layer in result.layers])}, saved.record)
    except Conflict:
        pass
    bias_bytes = 4 * slots * record.spec.num_layers * record.spec.num_kv_heads
    return CompactReport(
        saved.record, method, float(result.kept.float().mean()), slots, record.kv_bytes, saved.record.kv_bytes + bias_bytes,
        time.perf_counter() - started, error,
    )


def _host_queries(host: ModelHost | None, record: SessionRecord, method: str, cache: Any = None):
    if host is None:
        raise InvalidRequest(f"{method} needs reference queries: this server hosts no model, so supply them in the request")
    host.require_spec(record.spec, f"compacting session {record.session_id!r}")
    from compaction.references import ReferenceCache, reference_queries

    def make():
        with host.use() as (model, tokenizer):
            refs = reference_queries(model, tokenizer, torch.from_numpy(record.token_ids.astype(np.int64)).view(1, -1))
        return refs.queries, refs.held_out

    if cache is None:
        return make()
    return cache.get_or_make(ReferenceCache.key(record, host.spec.digest()), make)
