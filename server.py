"""kvmem server: composition root (config -> store -> gRPC server), health, graceful shutdown.

Servicer methods only translate protobuf <-> domain and map errors to status codes (one table,
kvmem.status). Run ``python server.py --help``.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import torch

try:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
except ImportError as missing:  # a client-only install (pip install kvmem)
    raise SystemExit(f"kvmem-server needs the server extra: pip install 'kvmem[server]' ({missing})") from None

from compaction.naming import option_value
from kvmem import convert, tls, wire
from kvmem.auth import KeyRing, KeysFileError
from kvmem.config import ConfigError, PlannerSettings, RetrievalSettings, ServiceConfig, load_config
from kvmem.frontend import SERVICE_NAME, FrontEnd, FrontEndSettings
from kvmem.v1 import kvmem_pb2 as pb
from kvstore.errors import CorruptData, FailedPrecondition, InvalidRequest, Unavailable
from kvstore.scrub import Scrubber
from kvstore.store import OpenWrite, RestorePlan, SessionStore
from kvstore.validation import positions_array

log = logging.getLogger("kvmem.server")


# ---------------------------------------------------------------------------- logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# ---------------------------------------------------------------------------- servicer
@dataclass
class PendingWrite:
    """A Save/Append whose header was accepted; chunks go into ``pieces`` (written as they
    arrive, invisible) until the Commit; the front end calls ``pieces.abort()`` on any failure."""

    tenant: str
    header: Any
    spec: Any
    tokens: np.ndarray
    pieces: OpenWrite


def _reference_queries(message: pb.ReferenceQueries, spec) -> list | None:
    """Per-layer float32 [Hq, n, D] tensors from the request, validated against the model spec."""
    import torch

    if not message.layers:
        return None
    heads, count = message.num_query_heads, message.num_queries
    if len(message.layers) != spec.num_layers:
        raise InvalidRequest(f"reference queries for {len(message.layers)} layers, but the model has {spec.num_layers}")
    if heads == 0 or heads % spec.num_kv_heads or count == 0:
        raise InvalidRequest(f"reference queries need num_query_heads (a multiple of {spec.num_kv_heads}) and num_queries > 0")
    expected = heads * count * spec.head_dim * 4
    tensors = []
    for index, data in enumerate(message.layers):
        if len(data) != expected:
            raise InvalidRequest(f"reference queries, layer {index}: {len(data)} bytes, expected {expected} (float32 [{heads}, {count}, {spec.head_dim}])")
        tensor = torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(heads, count, spec.head_dim).copy())
        if not torch.isfinite(tensor).all():  # as kvmem/reference_stream.py refuses them in streamed references
            raise InvalidRequest(f"reference queries, layer {index}: queries contain NaN or Inf")
        tensors.append(tensor)
    return tensors


class KVMemServicer:
    """The domain side of every RPC: protobuf in, store call, protobuf out (synchronous; the
    front end, kvmem.frontend, runs these on its thread pool after identifying the caller).

    Every method takes the Call first: ``call.tenant_for(request.tenant)`` is the only way a
    tenant is chosen.
    """

    def __init__(self, store: SessionStore, host=None, retrieval: RetrievalSettings | None = None, indexer=None, planner: PlannerSettings | None = None, quota_for=None, metrics=None,
                 references=None):
        self.store = store
        self.references = references  # compaction.references.ReferenceCache or None
        self.planner = planner or PlannerSettings()
        self._planner_model = None
        self.host = host  # the hosted model (modelhost.host.ModelHost) or None
        self.retrieval = retrieval or RetrievalSettings()
        self.indexer = indexer  # retrieval.service.IndexBuilder or None
        self.quota_for = quota_for  # tenant -> kvstore.quota.Quota (for GetStats), or None
        self.metrics = metrics  # kvmem.metrics.Metrics or None: compaction, retrieval, planner timings
        from retrieval.index_cache import IndexCache

        self.index_cache = IndexCache(self.retrieval.index_cache_bytes)  # block indexes in memory (Retrieve, Answer, recall)
        self._embedder = None
        self._embedder_lock = threading.Lock()

    # ------------------------------------------------------------------ writes
    def open_save(self, call, header) -> PendingWrite:
        tenant = call.tenant_for(header.tenant)
        spec = convert.spec_from_pb(header.model)
        tokens = np.asarray(header.token_ids, dtype=np.uint32)
        if header.reuse_prefix_tokens > len(tokens):
            raise InvalidRequest(f"reuse_prefix_tokens={header.reuse_prefix_tokens} exceeds the {len(tokens)} token ids of the header")
        # checked before any chunk is read (uint64 on the wire: never wraps into int64)
        positions = positions_array(list(header.positions), len(tokens)) if len(header.positions) else None
        write = self.store.begin_save(
            tenant, header.session_id, spec, tokens, has_bias=header.has_bias, positions=positions,
            logical_length=header.logical_length, ttl_seconds=header.ttl_seconds, overwrite=header.overwrite,
            reuse_prefix_tokens=header.reuse_prefix_tokens, text=header.text or None,
        )
        return PendingWrite(tenant, header, spec, tokens, write)

    def commit_save(self, call, pending: PendingWrite) -> pb.SaveSessionResponse:
        result = pending.pieces.commit()
        call.bytes = result.bytes_written
        self._index_later(result.record)
        return pb.SaveSessionResponse(session=convert.session_info(result.record), deduplicated_tokens=result.deduplicated_tokens, bytes_written=result.bytes_written)

    def open_append(self, call, header) -> PendingWrite:
        tenant = call.tenant_for(header.tenant)
        spec = convert.spec_from_pb(header.model)
        expected = header.expected_num_tokens if header.HasField("expected_num_tokens") else None
        tokens = convert.tokens_array(header.token_ids)
        write = self.store.begin_append(tenant, header.session_id, spec, tokens, expected_num_tokens=expected, ttl_seconds=header.ttl_seconds, text=header.text or None)
        return PendingWrite(tenant, header, spec, tokens, write)

    def commit_append(self, call, pending: PendingWrite) -> pb.AppendSessionResponse:
        result = pending.pieces.commit()
        call.bytes = result.bytes_written
        self._index_later(result.record)
        return pb.AppendSessionResponse(session=convert.session_info(result.record), bytes_written=result.bytes_written)

    def fork(self, call, request) -> pb.ForkSessionResponse:
        tenant = call.tenant_for(request.tenant)
        call.session = request.target_session_id
        at = request.at_token if request.HasField("at_token") else None
        result = self.store.fork(tenant, request.source_session_id, request.target_session_id, at, ttl_seconds=request.ttl_seconds, overwrite=request.overwrite)
        call.bytes = result.copied_tokens * result.record.spec.bytes_per_token
        return pb.ForkSessionResponse(session=convert.session_info(result.record), shared_tokens=result.shared_tokens, copied_tokens=result.copied_tokens)

    def delete_session(self, call, request) -> pb.DeleteSessionResponse:
        tenant = call.tenant_for(request.tenant)
        call.session = request.session_id
        freed = self.store.delete(tenant, request.session_id)
        call.bytes = freed
        return pb.DeleteSessionResponse(bytes_freed=freed)

    # ------------------------------------------------------------------ reads
    def restore(self, call, request) -> Iterator:
        """Header message, then pre-encoded chunk messages (no extra copies)."""
        tenant = call.tenant_for(request.tenant)
        if len(request.recall_for) or request.recall_tokens:
            return self._recall_messages(tenant, request)
        if request.session_id:
            expected = convert.spec_from_pb(request.model) if request.HasField("model") else None
            plan = self.store.restore(tenant, request.session_id, expected, request.token_start, request.token_end)
        else:
            if not request.HasField("model") or not len(request.lookup_token_ids):
                raise InvalidRequest("give a session_id, or lookup_token_ids together with the model spec")
            plan = self.store.restore_prefix(tenant, convert.spec_from_pb(request.model), convert.tokens_array(request.lookup_token_ids), request.token_start, request.token_end)

        def messages():
            yield pb.RestoreSessionResponse(header=self._restore_header(plan))
            dtype = convert.DTYPE_TO_PB[plan.record.spec.dtype]
            pieces = ((p.layer, p.token_start, p.num_tokens, dtype, p.keys, p.values, p.bias) for p in plan.pieces())
            yield from wire.encode_chunk_messages(pieces, convert.MAX_CHUNK_BYTES)

        return messages()

    def _recall_messages(self, tenant: str, request) -> Iterator:
        """A compacted session restored with exact KV recalled from its source for a question
        (retrieval/recall.py): header, then the combined slots per layer in chunk-sized pieces."""
        from retrieval.recall import RecallConfig, load_compacted, recall, source_of

        if not request.session_id:
            raise InvalidRequest("recall_for needs the session_id of a compacted session")
        if not len(request.recall_for):
            raise InvalidRequest("recall_tokens needs recall_for: the question's token ids to recall exact KV for")
        if request.token_start or request.token_end:
            raise InvalidRequest("recall restores the whole compacted session; leave token_start and token_end at 0")
        record = self.store.get(tenant, request.session_id)
        if request.HasField("model"):
            record.spec.require_same(convert.spec_from_pb(request.model), f"session {request.session_id!r}")
        if self.host is None:
            raise FailedPrecondition("recall needs a hosted model (set [model] name) to run the question; this server hosts none")
        self.host.require_spec(record.spec, "recall", "(it runs the question over the compacted cache)", "restore on a server that hosts that model")
        question = convert.tokens_array(request.recall_for).astype(np.int64)
        config = RecallConfig(budget_tokens=request.recall_tokens or self.planner.recall_budget_tokens, double_count=self.planner.recall_double_count,
                              block_tokens=self.planner.recall_block_tokens, representatives=self.planner.recall_representatives,
                              margin_tokens=self.planner.recall_margin_tokens)
        source = source_of(self.store, record)  # refuses a plain session (or a gone source) before anything is read
        compacted = load_compacted(self.store, tenant, request.session_id)
        window = self.host.window()
        if compacted.logical_length + len(question) > window:
            raise InvalidRequest(f"the session's {compacted.logical_length} positions plus a {len(question)}-token question exceed the model's "
                                 f"{window}-token window; ask a shorter question")
        from retrieval.service import block_index

        # the source's index is loaded (or built) without holding the model; recall checks the source again against what it loaded
        index_config = config.index_config(self._block_index_config())  # recall's own index (RecallConfig), not Retrieve's
        index = block_index(self.store, self.host.rope(), tenant, source.session_id, index_config, cache=self.index_cache, record=source).index
        with self.host.use() as (model, _):
            vocabulary = model.get_input_embeddings().num_embeddings
            if int(question.max()) >= vocabulary:
                raise InvalidRequest(f"recall_for holds token id {int(question.max())}, past the model's vocabulary of {vocabulary}")
            recalled = recall(model, self.store, compacted, torch.from_numpy(question), config, self._block_index_config(), index)
        width = recalled.keys[0].shape[1] - compacted.keys[0].shape[1]
        first = recalled.tokens[0]
        token_ids = np.concatenate([compacted.record.token_ids, recalled.source.token_ids[first], np.zeros(width - len(first), np.uint32)])
        positions = np.concatenate([compacted.record.positions_or_default(), first, np.zeros(width - len(first), np.int64)])
        slots = len(token_ids)
        step = self.store.config.chunk_tokens
        pieces = [(layer, start, min(step, slots - start)) for layer in range(len(recalled.keys)) for start in range(0, slots, step)]
        dtype = convert.DTYPE_TO_PB[record.spec.dtype]

        def messages():
            yield pb.RestoreSessionResponse(header=pb.RestoreHeader(
                session=convert.session_info(compacted.record), token_start=0, token_end=slots, token_ids=token_ids.tolist(),
                positions=positions.tolist(), num_chunks=len(pieces), recalled_tokens=width, recall_bytes_read=recalled.bytes_read,
            ))
            chunks = ((layer, start, n, dtype, _tensor_bytes(recalled.keys[layer][:, start:start + n]), _tensor_bytes(recalled.values[layer][:, start:start + n]),
                       recalled.bias[layer][:, start:start + n].contiguous().numpy().astype("<f4").tobytes()) for layer, start, n in pieces)
            yield from wire.encode_chunk_messages(chunks, convert.MAX_CHUNK_BYTES)

        return messages()

    @staticmethod
    def _restore_header(plan: RestorePlan) -> pb.RestoreHeader:
        return pb.RestoreHeader(
            session=convert.session_info(plan.record), token_start=plan.start, token_end=plan.end,
            token_ids=plan.token_ids.tolist(), positions=plan.positions.tolist(), num_chunks=plan.num_pieces,
        )

    def lookup(self, call, request) -> pb.LookupResponse:
        matched = self.store.lookup(call.tenant_for(request.tenant), convert.spec_from_pb(request.model), convert.tokens_array(request.token_ids))
        return pb.LookupResponse(matched_tokens=matched, chunk_tokens=self.store.config.chunk_tokens)

    def get_session(self, call, request) -> pb.SessionInfo:
        return convert.session_info(self.store.get(call.tenant_for(request.tenant), request.session_id))

    def list_sessions(self, call, request) -> pb.ListSessionsResponse:
        records, next_token = self.store.list(call.tenant_for(request.tenant), request.page_size, request.page_token)
        return pb.ListSessionsResponse(sessions=[convert.session_info(r) for r in records], next_page_token=next_token)

    def get_stats(self, call, request) -> pb.GetStatsResponse:
        """Admins (and servers without auth) see the totals; a tenant sees only its own usage."""
        tenant = call.tenant_for(request.tenant)
        response = pb.GetStatsResponse(chunk_tokens=self.store.config.chunk_tokens, usage=self._usage(tenant))
        if not call.is_admin:
            return response
        stats = self.store.stats()
        for tier in stats["tiers"]:
            lookups = tier["hits"] + tier["misses"]
            response.tiers.append(pb.TierStats(**tier, hit_rate=tier["hits"] / lookups if lookups else 0.0))
        for name in ("sessions", "chunks", "logical_bytes", "stored_bytes", "lmdb_map_bytes", "lmdb_used_bytes"):
            setattr(response, name, stats[name])
        return response

    def _usage(self, tenant: str) -> pb.TenantUsage:
        usage = self.store.usage(tenant)
        quota = self.quota_for(tenant) if self.quota_for is not None else None
        return pb.TenantUsage(
            tenant=tenant, sessions=usage.sessions, stored_bytes=usage.stored_bytes, logical_bytes=usage.logical_bytes,
            max_sessions=quota.max_sessions if quota else 0, max_stored_bytes=quota.max_stored_bytes if quota else 0,
        )

    def compact_streamed(self, call, request, assembler) -> pb.CompactResponse:
        """CompactStream: the request with its reference queries collected from the stream."""
        if request.queries.layers or request.held_out.layers:
            raise InvalidRequest("CompactStream takes reference queries as ReferencePart messages, not inline in its request")
        spec = self.store.get(call.tenant_for(request.tenant), request.session_id).spec
        queries, held_out = assembler.tensors(spec.num_layers, spec.num_kv_heads, spec.head_dim)
        return self.compact(call, request, (queries, held_out))

    def compact(self, call, request, streamed=None) -> pb.CompactResponse:
        from compaction.base import Target
        from compaction.service import compact_session

        tenant = call.tenant_for(request.tenant)
        call.session = request.session_id
        if (request.ratio != 0) == (request.budget > 0):
            raise InvalidRequest("give exactly one of ratio in (0, 1] or budget > 0")
        target = Target(ratio=request.ratio) if request.ratio != 0 else Target(budget=request.budget)
        spec = self.store.get(tenant, request.session_id).spec
        queries, held_out = streamed or (_reference_queries(request.queries, spec), _reference_queries(request.held_out, spec))
        report = compact_session(
            self.store, self.host, tenant, request.session_id, request.method, target,
            target_session_id=request.target_session_id, replace=request.replace,
            queries=queries, held_out=held_out,
            options={key: option_value(value) for key, value in request.options.items()}, references=self.references,
            overwrite=request.overwrite, drop_source=request.drop_source, name_options=dict(request.options),
        )
        call.session, call.bytes = report.record.session_id, report.bytes_after
        if self.metrics is not None:
            self.metrics.compaction.labels(report.method).observe(report.seconds)
        log.info("session compacted", extra={"fields": {"tenant": tenant, "session": request.session_id, "method": report.method, "kept": report.kept_tokens, "seconds": round(report.seconds, 3)}})
        return pb.CompactResponse(
            session=convert.session_info(report.record), method=report.method, kept_tokens=report.kept_tokens, slots=report.slots,
            bytes_before=report.bytes_before, bytes_after=report.bytes_after, seconds=report.seconds,
            heldout_attention_error=report.heldout_attention_error,
        )

    # ------------------------------------------------------------------ retrieval
    def _index_later(self, record) -> None:
        if self.indexer is not None and not record.has_bias:
            self.indexer.submit(record.tenant, record.session_id)

    def _block_index_config(self):
        from retrieval.service import index_config_from

        return index_config_from(self.retrieval)

    def retrieve(self, call, request) -> Iterator:
        """Header, one RetrievedLayer per layer, then (include_kv) KV chunks; the selection is
        computed when the first message is asked for (on the front end's pool)."""
        return self._retrieve_messages(call.tenant_for(request.tenant), request, time.perf_counter())

    def _retrieve_messages(self, tenant: str, request, started: float) -> Iterator:
        from retrieval.context import RetrievalConfig
        from retrieval.service import retrieve

        record = self.store.get(tenant, request.session_id)
        given = [bool(len(request.query_token_ids)), bool(request.query_text), request.HasField("query_vectors")]
        if sum(given) != 1:
            raise InvalidRequest("give exactly one query: query_token_ids, query_text or query_vectors")
        if request.budget_tokens == 0:
            raise InvalidRequest("budget_tokens must be at least 1")
        if request.budget_tokens > record.num_tokens:
            raise InvalidRequest(f"budget of {request.budget_tokens} tokens exceeds the session's {record.num_tokens} tokens; restore the full session instead")
        if self.host is None:
            raise FailedPrecondition("Retrieve needs a hosted model (set [model] name); this server hosts none")
        self.host.require_spec(record.spec, "Retrieve", "(its RoPE and its queries)", "retrieve on a server that hosts that model")
        config = RetrievalConfig(
            method=request.method or "actqkv", budget_tokens=request.budget_tokens, sink_tokens=self.retrieval.sink_tokens,
            recent_tokens=self.retrieval.recent_tokens, dynamic=request.dynamic_budget if request.HasField("dynamic_budget") else True,
            int8_first_scan=self.retrieval.int8_first_scan,
        )
        vectors = _reference_queries(request.query_vectors, record.spec) if given[2] else None
        ids = torch.from_numpy(convert.tokens_array(request.query_token_ids).astype(np.int64)) if given[0] else None
        index_config = self._block_index_config()
        result = retrieve(self.store, self.host.use, tenant, request.session_id, config, index_config, question_ids=ids, query_vectors=vectors,
                          question_text=request.query_text, index_cache=self.index_cache, include_kv=request.include_kv,
                          rope=self.host.rope(), window=self.host.window())
        selection, kv = result.selection, result.kv
        if self.metrics is not None:
            self.metrics.retrieval.labels(config.method).observe(time.perf_counter() - started)
        runs = [_token_runs(layer.tokens) for layer in selection.layers] if request.include_kv else []
        yield pb.RetrieveResponse(header=pb.RetrieveHeader(
            session=convert.session_info(result.record), method=config.method, budget_tokens=config.budget_tokens,
            block_tokens=index_config.block_tokens, sink_end=selection.sink_end, recent_start=selection.recent_start,
            index_rebuilt=result.index_rebuilt, seconds=time.perf_counter() - started, num_chunks=sum(len(r) for r in runs),
            bytes_read=result.bytes_read,
        ))
        from retrieval.context import ranked_spans

        for number, layer in enumerate(selection.layers):
            order, spans = ranked_spans(layer)  # best first, each with the margins answering adds
            yield pb.RetrieveResponse(layer=pb.RetrievedLayer(
                layer=number, block_starts=[a for a, _ in spans], block_lengths=[b - a for a, b in spans],
                scores=layer.scores[order].tolist(), entropy=layer.entropy, num_tokens=len(layer.tokens),
            ))
        dtype = convert.DTYPE_TO_PB[record.spec.dtype]
        for number, layer_runs in enumerate(runs):
            for start, end in layer_runs:
                keys, values = kv.take(number, np.arange(start, end))
                yield pb.RetrieveResponse(chunks=pb.KVChunks(chunks=[pb.KVChunk(
                    layer=number, token_start=start, num_tokens=end - start, dtype=dtype, keys=_tensor_bytes(keys), values=_tensor_bytes(values),
                )]))

    def _text_embedder(self):
        if not self.retrieval.text_search:
            raise FailedPrecondition("text search is disabled on this server ([retrieval] text_search = false)")
        with self._embedder_lock:
            if self._embedder is None:
                from retrieval.embedder import TextEmbedder

                self._embedder = TextEmbedder.load()
            return self._embedder

    def search_text(self, call, request) -> pb.SearchTextResponse:
        from retrieval.service import text_index

        tenant = call.tenant_for(request.tenant)
        if not request.query.strip():
            raise InvalidRequest("query is empty; give the text to search for")
        if self.store.session_text(tenant, request.session_id) is None:  # checked before the embedder loads
            raise FailedPrecondition(f"session {request.session_id!r} was saved without text; save it with text to search it")
        embedder = self._text_embedder()
        loaded = text_index(self.store, embedder, tenant, request.session_id)
        hits = loaded.index.search(request.query, embedder, request.k or 5)
        return pb.SearchTextResponse(
            hits=[pb.TextHit(chunk=h.index, score=h.score, start_char=h.start_char, end_char=h.end_char, text=h.text) for h in hits],
            index_rebuilt=loaded.rebuilt,
        )

    # ------------------------------------------------------------------ planner
    def _question(self, call, request):
        from retrieval.plan_service import Question

        return Question(
            call.tenant_for(request.tenant), request.session_id, request.query,
            latency_budget_s=request.latency_budget_ms / 1000.0 if request.latency_budget_ms else None,
            force=request.force_option, forbid=list(request.forbid_options), expected_followups=request.expected_followups,
            max_new_tokens=request.max_new_tokens or 24,
            budgets={"rag_budget_tokens": request.rag_budget_tokens, "kv_budget_tokens": request.kv_budget_tokens,
                     "recall_budget_tokens": request.recall_budget_tokens},
        )

    def _decide(self, request, model, tokenizer, question):
        from retrieval.plan_service import executor_settings, load_planner_model, plan

        if self._planner_model is None:
            self._planner_model = load_planner_model(self.planner.model_path)
        from retrieval.executors import model_window

        settings = question.settings(executor_settings(self.planner, question.max_new_tokens, self._block_index_config()), model_window(model))
        embedder = self._text_embedder if self.retrieval.text_search else None
        decision, seconds = plan(self.store, model, tokenizer, self._planner_model, question, settings, embedder, self.planner.tolerance)
        return decision, seconds, settings, embedder

    def _planned(self, call, request):
        """(record, question) after the checks every planner request needs."""
        question = self._question(call, request)
        record = self.store.get(question.tenant, question.session_id)
        if self.host is None:
            raise FailedPrecondition("Plan and Answer need a hosted model (set [model] name); this server hosts none")
        self.host.require_spec(record.spec, "answering", "(it runs every option)", "ask a server that hosts that model")
        return record, question

    def plan(self, call, request) -> pb.Decision:
        _, question = self._planned(call, request)
        with self.host.use() as (model, tokenizer):
            decision, seconds, _, _ = self._decide(request, model, tokenizer, question)
        if self.metrics is not None:
            self.metrics.planner_choices.labels(decision.choice or "none", "Plan").inc()
        return _decision_pb(decision, seconds)

    def answer(self, call, request) -> pb.AnswerResponse:
        from retrieval.plan_service import run

        _, question = self._planned(call, request)
        with self.host.use() as (model, tokenizer):
            decision, seconds, settings, embedder = self._decide(request, model, tokenizer, question)
            execution = run(self.store, model, tokenizer, decision, question, settings, embedder, self.index_cache)
        if self.metrics is not None:
            self.metrics.planner_choices.labels(decision.choice or "none", "Answer").inc()
            for stage, stage_seconds in execution.stages.items():
                self.metrics.answer_stages.labels(decision.choice, stage).observe(stage_seconds)
        return pb.AnswerResponse(decision=_decision_pb(decision, seconds), text=execution.text, token_ids=execution.token_ids,
                                 seconds=execution.seconds, stages=execution.stages)


def _decision_pb(decision, planning_seconds: float) -> pb.Decision:
    f = decision.features
    features = pb.PlanFeatures(
        context_tokens=f.context_tokens, question_tokens=f.question_tokens, window=f.window, query_type=f.query_type, has_text=f.has_text,
        compacted_stored=f.compacted_stored, block_index_stored=f.block_index_stored, text_index_stored=f.text_index_stored,
        expected_followups=f.expected_followups,
    )
    if f.top1 is not None:
        features.top1, features.gap = f.top1, f.gap
    return pb.Decision(
        choice=decision.choice, reason=decision.reason, forced=decision.forced, latency_budget_s=decision.latency_budget_s or 0.0,
        features=features, planning_seconds=planning_seconds,
        options=[pb.OptionEstimate(option=o.option, feasible=o.feasible, seconds=o.seconds, question_seconds=o.question_seconds,
                                   preparation_seconds=o.preparation_seconds, quality=o.quality, quality_basis=o.quality_basis, ruled_out=o.ruled_out)
                 for o in decision.options],
    )


def _token_runs(tokens: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of ascending token indices."""
    if len(tokens) == 0:
        return []
    breaks = np.nonzero(np.diff(tokens) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(tokens)]])
    return [(int(tokens[a]), int(tokens[b - 1]) + 1) for a, b in zip(starts, ends)]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    from kvstore.pieces import tensor_raw_view

    return tensor_raw_view(tensor.contiguous()).tobytes()


# ---------------------------------------------------------------------------- composition
class Service:
    """A running kvmem service: store, gRPC server (grpc.aio on its own event-loop thread),
    health, maintenance thread. ``start``/``stop`` are plain blocking calls."""

    def __init__(self, config: ServiceConfig, store: SessionStore, loop: asyncio.AbstractEventLoop, loop_thread: threading.Thread,
                 server: grpc.aio.Server, port: int, health_servicer, pool: futures.ThreadPoolExecutor, frontend: FrontEnd,
                 keyring: KeyRing | None = None, indexer=None, host=None, metrics=None):
        self.config = config
        self.host = host  # modelhost.host.ModelHost or None
        self.indexer = indexer
        self.store = store
        self.server = server
        self.port = port
        self.health = health_servicer
        self.keyring = keyring
        self.frontend = frontend
        self.metrics = metrics  # kvmem.metrics.Metrics
        self.metrics_port = 0  # bound once start() serves them ([metrics] enabled)
        self._loop = loop
        self._loop_thread = loop_thread
        self._pool = pool
        self._stop = threading.Event()
        rate = config.store.scrub_bytes_per_second
        self._scrubber = Scrubber(store, rate) if rate else None
        self._maintenance = threading.Thread(target=self._maintain, name="kvmem-maintenance", daemon=True)

    def _on_loop(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def start(self) -> "Service":
        async def start():
            await self.server.start()
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

        self._on_loop(start(), 60)
        if self.metrics is not None and self.config.metrics.enabled:
            self.metrics_port = self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
        self._maintenance.start()
        log.info("serving", extra={"fields": {"port": self.port, "data_dir": str(self.config.store.data_dir), "durable": self.config.store.durable, **security_posture(self.config)}})
        return self

    def reload_keys(self) -> bool:
        """Re-read the keys file (SIGHUP); calls in flight are not affected."""
        return self.keyring.reload() if self.keyring is not None else False

    def _maintain(self) -> None:
        while not self._stop.wait(self.config.server.maintenance_seconds):
            try:
                self.store.collect_expired()
                self.store.sweep_staged()
                if self._scrubber is not None:
                    self._scrubber.run_for(self.config.server.maintenance_seconds)
                if not self.config.store.durable:
                    self.store.backend.sync()
            except Exception:  # noqa: BLE001 - keep the thread alive, but say what happened
                log.exception("maintenance failed")

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace``, close LMDB cleanly.

        Every step is bounded: a call that outlives its grace is cancelled, and a step that still
        hangs is logged and passed, so SIGTERM always ends the process with LMDB closed."""
        grace = self.config.server.grace_seconds if grace is None else grace

        async def stop():
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(grace)

        self._stop.set()
        try:
            self._on_loop(stop(), grace + 10)
        except Exception as exc:  # noqa: BLE001 - shutting down regardless; say what hung
            log.error("gRPC server did not stop in time; closing anyway", extra={"fields": {"error": repr(exc), "grace": grace}})
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)  # running work finishes before LMDB closes
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(10)
            if self.indexer is not None:
                self.indexer.close()
            if self.metrics is not None:
                self.metrics.close()
            self.store.close()
        log.info("stopped", extra={"fields": {"port": self.port}})


def model_cache_dir(config: ServiceConfig) -> Path:
    return Path(config.model.cache_dir) if config.model.cache_dir else Path(config.store.data_dir) / "models"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: could resolve anywhere


def tls_enabled(config: ServiceConfig) -> bool:
    return bool(config.tls.cert_file or config.tls.key_file)


def security_posture(config: ServiceConfig) -> dict:
    return {
        "auth": "+".join(kind for kind, on in (("keys", config.auth.keys_file), ("certificates", config.tls.client_ca_file)) if on) or "off",
        "tls": ("mutual" if config.tls.client_ca_file else "on") if tls_enabled(config) else "off",
        "insecure": config.server.insecure,
    }


def check_security(config: ServiceConfig) -> None:
    """Refuse to listen beyond loopback without auth and TLS unless insecure is explicit."""
    if config.tls.client_ca_file and not tls_enabled(config):
        raise ConfigError("tls.client_ca_file needs tls.cert_file and tls.key_file (mutual TLS is TLS first)")
    authenticated = bool(config.auth.keys_file or config.tls.client_ca_file)  # API keys, or client certificates
    missing = [name for name, on in (("auth.keys_file", authenticated), ("tls.cert_file + tls.key_file", tls_enabled(config))) if not on]
    if missing and not is_loopback(config.server.host):
        if not config.server.insecure:
            raise ConfigError(
                f"refusing to listen on {config.server.host}, which is not a loopback address, without {' and '.join(missing)}: "
                "anyone who reaches the port could read every tenant's KV. Set them, bind 127.0.0.1, or pass --insecure "
                "(server.insecure = true) to accept the risk"
            )
        log.warning("INSECURE: listening beyond loopback without " + " and ".join(missing), extra={"fields": {"host": config.server.host, **security_posture(config)}})


def quota_resolver(config: ServiceConfig, keyring: KeyRing | None):
    """tenant -> Quota: the [quota] defaults, overridden by the tenant's keys (read on each call,
    so a reloaded keys file takes effect at once)."""
    from kvstore.quota import Quota

    defaults = {"max_stored_bytes": config.quota.max_stored_bytes, "max_sessions": config.quota.max_sessions}

    def quota_for(tenant: str) -> Quota:
        overrides = keyring.keys.quota_overrides(tenant) if keyring is not None else {}
        return Quota(**(defaults | overrides))

    return quota_for


def create_service(config: ServiceConfig, store: SessionStore | None = None) -> Service:
    """Open the store and bind the gRPC server (port 0 picks a free port). Not started yet.

    The configured model is hosted lazily: it is loaded on the first request that needs it.
    """
    from modelhost.host import ModelHost

    check_security(config)
    try:
        keyring = KeyRing(Path(config.auth.keys_file)) if config.auth.keys_file else None
        credentials = tls.server_credentials(config.tls.cert_file, config.tls.key_file, config.tls.client_ca_file) if tls_enabled(config) else None
    except (KeysFileError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    quota_for = quota_resolver(config, keyring)
    store = store or SessionStore.open(config.store)
    store.quota_for = quota_for
    import faiss

    faiss.omp_set_num_threads(1)  # searches are one probe at a time: OpenMP wake-ups cost more than they save
    host = ModelHost(config.model.name, model_cache_dir(config)) if config.model.name else None
    indexer = _index_builder(config, store, host) if host is not None and config.retrieval.index_on_save else None
    from kvmem.metrics import Metrics

    metrics = Metrics()
    from compaction.references import ReferenceCache

    references = ReferenceCache(config.model.reference_cache_bytes)
    servicer = KVMemServicer(store, host, config.retrieval, indexer, config.planner, quota_for, metrics, references)
    pool = futures.ThreadPoolExecutor(max_workers=config.server.max_workers, thread_name_prefix="kvmem-rpc")
    server_settings = config.server
    frontend = FrontEnd(servicer, pool, keyring, FrontEndSettings(server_settings.stream_idle_timeout_s, server_settings.max_streams_per_tenant, server_settings.max_streams_per_connection,
                                                          server_settings.max_reference_bytes),
                        client_certificates=bool(config.tls.client_ca_file), metrics=metrics)
    metrics.watch_store(store, frontend.limits.open_streams)
    limit = server_settings.max_message_bytes
    options = [
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit), ("grpc.so_reuseport", 0),
        # connections that stay open without calls are closed; dead peers are found by keepalive pings
        ("grpc.max_connection_idle_ms", 5 * 60 * 1000), ("grpc.keepalive_time_ms", 60 * 1000), ("grpc.keepalive_timeout_ms", 20 * 1000),
    ]
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="kvmem-grpc-loop", daemon=True)
    loop_thread.start()

    async def build():
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=server_settings.max_concurrent_rpcs)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, frontend.handlers()),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if server_settings.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{server_settings.host}:{server_settings.port}"
        try:
            port = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        return server, health_servicer, port

    server, health_servicer, port = asyncio.run_coroutine_threadsafe(build(), loop).result(60)
    if port == 0:
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        pool.shutdown()
        if indexer is not None:
            indexer.close()
        store.close()
        raise ConfigError(f"cannot bind {server_settings.host}:{server_settings.port} (in use?)")
    return Service(config, store, loop, loop_thread, server, port, health_servicer, pool, frontend, keyring, indexer, host, metrics)


def _index_builder(config: ServiceConfig, store: SessionStore, host):
    """Background block indexing for sessions of the hosted model (others are indexed on demand
    only when they are retrieved from, which needs their model anyway)."""
    from retrieval.rope import Rope
    from retrieval.service import IndexBuilder, index_config_from

    def rope_for(spec):
        if not host.accepts(spec):
            return None
        with host.use() as (model, _):
            return Rope.from_model(model)

    return IndexBuilder(store, rope_for, index_config_from(config.retrieval))


def prepare_model(config: ServiceConfig) -> None:
    """Make the configured model available (convert the bundled GGUF once) without loading it."""
    from modelhost.models import BUNDLED_NAME, prepare_model as prepare

    if config.model.prepare and config.model.name == BUNDLED_NAME:
        started = time.perf_counter()
        path = prepare(model_cache_dir(config), BUNDLED_NAME)
        log.info("model ready", extra={"fields": {"model": BUNDLED_NAME, "path": str(path), "seconds": round(time.perf_counter() - started, 2)}})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvmem-server", description="Run the kvmem gRPC service.")
    parser.add_argument("--config", help="TOML config file (default: $KVMEM_CONFIG if set)")
    parser.add_argument("--host", help="bind address (server.host)")
    parser.add_argument("--port", type=int, help="port, 0 = any free port (server.port)")
    parser.add_argument("--data-dir", help="data directory for LMDB and models (store.data_dir)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback address without auth and TLS (server.insecure)")
    parser.add_argument("--keys-file", help="API keys file; turns auth on (auth.keys_file)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config key")
    return parser.parse_args(argv)


def tune_malloc() -> bool:
    """Blocks of streaming writes are 0.1-4 MB buffers allocated and freed on many pool threads.
    With glibc's defaults each thread gets its own arena and freed buffers stay spread over them
    (peak RSS of one 32k-token save varied 40-100 MB from run to run); two arenas keep it at
    20-35 MB at the same speed. (A fixed mmap threshold bounded memory too, but every large
    buffer then cost fresh page faults: restores ran 3x slower.) False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_arena_max = -8
        return bool(libc.mallopt(m_arena_max, 2))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_malloc()
    overrides = list(args.set)
    for flag, key in ((args.host, "server.host"), (args.port, "server.port"), (args.data_dir, "store.data_dir"), (args.keys_file, "auth.keys_file")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.insecure:
        overrides.append("server.insecure=true")
    try:
        config = load_config(args.config or os.environ.get("KVMEM_CONFIG"), os.environ, overrides)
    except (ConfigError, OSError) as exc:
        print(f"kvmem-server: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.server.log_level, config.server.log_format)
    prepare_model(config)
    try:
        service = create_service(config).start()
    except (ConfigError, CorruptData, Unavailable) as exc:
        log.error("not started", extra={"fields": {"error": str(exc)}})
        print(f"kvmem-server: {exc}", file=sys.stderr)
        return 2
    # everything imported so far lives as long as the process: move it out of the collector's
    # sight, so a full collection no longer walks ~175k long-lived objects (~100 ms pauses that
    # showed as call-latency spikes in bench/security.py)
    gc.collect()
    gc.freeze()
    if config.server.port_file:
        Path(config.server.port_file).write_text(str(service.port))
    stopping = threading.Event()

    def on_signal(signum, _frame):
        log.info("shutdown requested", extra={"fields": {"signal": signal.Signals(signum).name}})
        stopping.set()

    def on_hangup(_signum, _frame):
        threading.Thread(target=service.reload_keys, name="kvmem-reload-keys", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    # wake up regularly: a signal the kernel hands to another thread (grpc's, the pool's) sets
    # Python's flag but does not interrupt this thread's wait, and handlers run only on this thread
    while not stopping.wait(0.25):
        pass
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
