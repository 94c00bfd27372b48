"""kvmem server: composition root (config -> store -> gRPC server), health, graceful shutdown.

Servicer methods only translate protobuf <-> domain and map errors to status codes (one table,
kvmem.status). Run ``python server.py --help``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvmem import convert, wire
from kvmem.config import ConfigError, PlannerSettings, RetrievalSettings, ServiceConfig, load_config
from kvmem.status import code_for
from kvmem.v1 import kvmem_pb2 as pb
from kvmem.v1 import kvmem_pb2_grpc as pb_grpc
from kvstore.errors import FailedPrecondition, InvalidRequest, KvmemError
from kvstore.pieces import KVPieces
from kvstore.store import RestorePlan, SessionStore

log = logging.getLogger("kvmem.server")
SERVICE_NAME = "kvmem.v1.KVMem"


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


# ---------------------------------------------------------------------------- errors
def _abort(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    if isinstance(exc, KvmemError):
        code = code_for(exc)
        log.info("request failed", extra={"fields": {"method": method, "code": code.name, "error": str(exc)}})
        context.abort(code, str(exc))
    request_id = uuid.uuid4().hex[:12]
    log.error("internal error", extra={"fields": {"method": method, "request_id": request_id, "traceback": traceback.format_exc()}})
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); the server log has the details")


def unary(method: Callable) -> Callable:
    """Wrap a unary-response handler: kvmem errors -> status codes, anything else -> INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status, none is swallowed
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                raise
            _abort(context, method.__name__, exc)

    return wrapper


def streaming(method: Callable) -> Callable:
    """Like ``unary`` for handlers that yield responses."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, method.__name__, exc)

    return wrapper


# ---------------------------------------------------------------------------- servicer
def _collect_pieces(parts: Iterator, pieces: KVPieces) -> None:
    """Feed chunk messages into ``pieces`` until the Commit; raise if the stream ends first."""
    received = 0
    for part in map(wire.as_part, parts):
        if part.kind == "chunks":
            for chunk in part.chunks:
                pieces.add(chunk.layer, chunk.token_start, chunk.num_tokens, chunk.dtype, chunk.keys, chunk.values, chunk.bias if len(chunk.bias) else None)
                received += 1
        elif part.kind == "commit":
            if part.message.num_chunks != received:
                raise InvalidRequest(f"commit says {part.message.num_chunks} chunks were sent but {received} arrived; nothing was stored")
            return
        elif part.kind == "malformed":
            raise InvalidRequest(f"malformed stream message ({part.message}); nothing was stored")
        else:
            raise InvalidRequest(f"unexpected {part.kind or 'empty'} message after the header; send chunks, then one commit")
    raise InvalidRequest("the stream ended before its commit message; nothing was stored")


def _first_header(parts: Iterator, what: str):
    first = next(parts, None)
    part = wire.as_part(first) if first is not None else None
    if part is None or part.kind != "header":
        raise InvalidRequest(f"the first message of {what} must be its header")
    return part.message


def _option_value(text: str):
    """Method options arrive as strings; numbers and booleans are parsed."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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
        tensors.append(torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(heads, count, spec.head_dim).copy()))
    return tensors


class KVMemServicer(pb_grpc.KVMemServicer):
    def __init__(self, store: SessionStore, host=None, retrieval: RetrievalSettings | None = None, indexer=None, planner: PlannerSettings | None = None):
        self.store = store
        self.planner = planner or PlannerSettings()
        self._planner_model = None
        self.host = host  # the hosted model (kvstore.model_host.ModelHost) or None
        self.retrieval = retrieval or RetrievalSettings()
        self.indexer = indexer  # retrieval.service.IndexBuilder or None
        self._embedder = None
        self._embedder_lock = threading.Lock()

    @unary
    def SaveSession(self, request_iterator, context):
        messages = iter(request_iterator)
        header = _first_header(messages, "SaveSession")
        spec = convert.spec_from_pb(header.model)
        tokens = np.asarray(header.token_ids, dtype=np.uint32)
        pieces = self.store.new_pieces(spec, header.reuse_prefix_tokens, len(tokens), header.has_bias)
        _collect_pieces(messages, pieces)
        result = self.store.save(
            header.tenant or convert.DEFAULT_TENANT, header.session_id, spec, tokens, pieces,
            positions=np.asarray(header.positions, dtype=np.int64) if len(header.positions) else None,
            logical_length=header.logical_length, ttl_seconds=header.ttl_seconds, overwrite=header.overwrite,
            reuse_prefix_tokens=header.reuse_prefix_tokens, text=header.text or None,
        )
        self._index_later(result.record)
        return pb.SaveSessionResponse(session=convert.session_info(result.record), deduplicated_tokens=result.deduplicated_tokens, bytes_written=result.bytes_written)

    @streaming
    def RestoreSession(self, request, context):
        tenant = request.tenant or convert.DEFAULT_TENANT
        if request.session_id:
            expected = convert.spec_from_pb(request.model) if request.HasField("model") else None
            plan = self.store.restore(tenant, request.session_id, expected, request.token_start, request.token_end)
        else:
            if not request.HasField("model") or not len(request.lookup_token_ids):
                raise InvalidRequest("give a session_id, or lookup_token_ids together with the model spec")
            plan = self.store.restore_prefix(tenant, convert.spec_from_pb(request.model), convert.tokens_array(request.lookup_token_ids))
        yield pb.RestoreSessionResponse(header=self._restore_header(plan))
        dtype = convert.DTYPE_TO_PB[plan.record.spec.dtype]
        pieces = ((p.layer, p.token_start, p.num_tokens, dtype, p.keys, p.values, p.bias) for p in plan.pieces())
        yield from wire.encode_chunk_messages(pieces, convert.MAX_CHUNK_BYTES)  # pre-encoded: no extra copies

    @staticmethod
    def _restore_header(plan: RestorePlan) -> pb.RestoreHeader:
        return pb.RestoreHeader(
            session=convert.session_info(plan.record), token_start=plan.start, token_end=plan.end,
            token_ids=plan.token_ids.tolist(), positions=plan.positions.tolist(), num_chunks=plan.num_pieces,
        )

    @unary
    def AppendSession(self, request_iterator, context):
        messages = iter(request_iterator)
        header = _first_header(messages, "AppendSession")
        tenant = header.tenant or convert.DEFAULT_TENANT
        spec = convert.spec_from_pb(header.model)
        current = self.store.get(tenant, header.session_id)
        tokens = convert.tokens_array(header.token_ids)
        pieces = self.store.new_pieces(spec, current.num_tokens, current.num_tokens + len(tokens), current.has_bias)
        _collect_pieces(messages, pieces)
        expected = header.expected_num_tokens if header.HasField("expected_num_tokens") else None
        result = self.store.append(tenant, header.session_id, spec, tokens, pieces, expected_num_tokens=expected, ttl_seconds=header.ttl_seconds, text=header.text or None)
        self._index_later(result.record)
        return pb.AppendSessionResponse(session=convert.session_info(result.record), bytes_written=result.bytes_written)

    @unary
    def ForkSession(self, request, context):
        at = request.at_token if request.HasField("at_token") else None
        result = self.store.fork(
            request.tenant or convert.DEFAULT_TENANT, request.source_session_id, request.target_session_id, at,
            ttl_seconds=request.ttl_seconds, overwrite=request.overwrite,
        )
        return pb.ForkSessionResponse(session=convert.session_info(result.record), shared_tokens=result.shared_tokens, copied_tokens=result.copied_tokens)

    @unary
    def Lookup(self, request, context):
        matched = self.store.lookup(request.tenant or convert.DEFAULT_TENANT, convert.spec_from_pb(request.model), convert.tokens_array(request.token_ids))
        return pb.LookupResponse(matched_tokens=matched, chunk_tokens=self.store.config.chunk_tokens)

    @unary
    def GetSession(self, request, context):
        return convert.session_info(self.store.get(request.tenant or convert.DEFAULT_TENANT, request.session_id))

    @unary
    def ListSessions(self, request, context):
        records, next_token = self.store.list(request.tenant or convert.DEFAULT_TENANT, request.page_size, request.page_token)
        return pb.ListSessionsResponse(sessions=[convert.session_info(r) for r in records], next_page_token=next_token)

    @unary
    def DeleteSession(self, request, context):
        return pb.DeleteSessionResponse(bytes_freed=self.store.delete(request.tenant or convert.DEFAULT_TENANT, request.session_id))

    @unary
    def GetStats(self, request, context):
        stats = self.store.stats()
        tiers = []
        for tier in stats["tiers"]:
            lookups = tier["hits"] + tier["misses"]
            tiers.append(pb.TierStats(**tier, hit_rate=tier["hits"] / lookups if lookups else 0.0))
        return pb.GetStatsResponse(
            tiers=tiers, sessions=stats["sessions"], chunks=stats["chunks"], logical_bytes=stats["logical_bytes"],
            stored_bytes=stats["stored_bytes"], lmdb_map_bytes=stats["lmdb_map_bytes"], lmdb_used_bytes=stats["lmdb_used_bytes"],
            chunk_tokens=stats["chunk_tokens"],
        )


    @unary
    def Compact(self, request, context):
        from compaction.base import Target
        from compaction.service import compact_session

        tenant = request.tenant or convert.DEFAULT_TENANT
        if (request.ratio != 0) == (request.budget > 0):
            raise InvalidRequest("give exactly one of ratio in (0, 1] or budget > 0")
        target = Target(ratio=request.ratio) if request.ratio != 0 else Target(budget=request.budget)
        spec = self.store.get(tenant, request.session_id).spec
        report = compact_session(
            self.store, self.host, tenant, request.session_id, request.method, target,
            target_session_id=request.target_session_id, replace=request.replace,
            queries=_reference_queries(request.queries, spec), held_out=_reference_queries(request.held_out, spec),
            options={key: _option_value(value) for key, value in request.options.items()},
        )
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
        from retrieval.block_index import BlockIndexConfig

        cfg = self.retrieval
        return BlockIndexConfig(block_tokens=cfg.block_tokens, representatives=cfg.representatives, exact_max_vectors=cfg.exact_max_vectors)

    @streaming
    def Retrieve(self, request, context):
        from retrieval.context import RetrievalConfig
        from retrieval.service import retrieve

        started = time.perf_counter()
        tenant = request.tenant or convert.DEFAULT_TENANT
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
        )
        vectors = _reference_queries(request.query_vectors, record.spec) if given[2] else None
        with self.host.use() as (model, tokenizer):
            ids = None
            if given[0]:
                ids = torch.from_numpy(convert.tokens_array(request.query_token_ids).astype(np.int64))
            elif given[1]:
                ids = tokenizer(request.query_text, return_tensors="pt", add_special_tokens=False).input_ids[0]
            result = retrieve(self.store, model, tenant, request.session_id, config, self._block_index_config(), question_ids=ids, query_vectors=vectors)
        selection, kv = result.selection, result.kv
        runs = [_token_runs(layer.tokens) for layer in selection.layers] if request.include_kv else []
        yield pb.RetrieveResponse(header=pb.RetrieveHeader(
            session=convert.session_info(result.record), method=config.method, budget_tokens=config.budget_tokens,
            block_tokens=self.retrieval.block_tokens, sink_end=selection.sink_end, recent_start=selection.recent_start,
            index_rebuilt=result.index_rebuilt, seconds=time.perf_counter() - started, num_chunks=sum(len(r) for r in runs),
        ))
        block_tokens = self.retrieval.block_tokens
        for number, layer in enumerate(selection.layers):
            order = np.argsort(-layer.scores, kind="stable")  # best first
            starts = (layer.blocks[order] * block_tokens).tolist()
            yield pb.RetrieveResponse(layer=pb.RetrievedLayer(
                layer=number, block_starts=starts, block_lengths=[min(block_tokens, record.num_tokens - s) for s in starts],
                scores=layer.scores[order].tolist(), entropy=layer.entropy, num_tokens=len(layer.tokens),
            ))
        dtype = convert.DTYPE_TO_PB[record.spec.dtype]
        for number, layer_runs in enumerate(runs):
            for start, end in layer_runs:
                yield pb.RetrieveResponse(chunks=pb.KVChunks(chunks=[pb.KVChunk(
                    layer=number, token_start=start, num_tokens=end - start, dtype=dtype,
                    keys=_tensor_bytes(kv.keys[number][:, start:end]), values=_tensor_bytes(kv.values[number][:, start:end]),
                )]))

    def _text_embedder(self):
        if not self.retrieval.text_search:
            raise FailedPrecondition("text search is disabled on this server ([retrieval] text_search = false)")
        with self._embedder_lock:
            if self._embedder is None:
                from retrieval.embedder import TextEmbedder

                self._embedder = TextEmbedder.load()
            return self._embedder

    @unary
    def SearchText(self, request, context):
        from retrieval.service import text_index

        tenant = request.tenant or convert.DEFAULT_TENANT
        if not request.query.strip():
            raise InvalidRequest("query is empty; give the text to search for")
        embedder = self._text_embedder()
        loaded = text_index(self.store, embedder, tenant, request.session_id)
        hits = loaded.index.search(request.query, embedder, request.k or 5)
        return pb.SearchTextResponse(
            hits=[pb.TextHit(chunk=h.index, score=h.score, start_char=h.start_char, end_char=h.end_char, text=h.text) for h in hits],
            index_rebuilt=loaded.rebuilt,
        )

    # ------------------------------------------------------------------ planner
    def _question(self, request):
        from retrieval.plan_service import Question

        return Question(
            request.tenant or convert.DEFAULT_TENANT, request.session_id, request.query,
            latency_budget_s=request.latency_budget_ms / 1000.0 if request.latency_budget_ms else None,
            force=request.force_option, forbid=list(request.forbid_options), expected_followups=request.expected_followups,
            max_new_tokens=request.max_new_tokens or 24,
        )

    def _decide(self, request, model, tokenizer, question):
        from retrieval.plan_service import executor_settings, load_planner_model, plan

        if self._planner_model is None:
            self._planner_model = load_planner_model(self.planner.model_path)
        settings = executor_settings(self.planner, question.max_new_tokens)
        embedder = self._text_embedder if self.retrieval.text_search else None
        decision, seconds = plan(self.store, model, tokenizer, self._planner_model, question, settings, embedder, self.planner.tolerance)
        return decision, seconds, settings, embedder

    def _planned(self, request):
        """(record, question) after the checks every planner request needs."""
        question = self._question(request)
        record = self.store.get(question.tenant, question.session_id)
        if self.host is None:
            raise FailedPrecondition("Plan and Answer need a hosted model (set [model] name); this server hosts none")
        self.host.require_spec(record.spec, "answering", "(it runs every option)", "ask a server that hosts that model")
        return record, question

    @unary
    def Plan(self, request, context):
        _, question = self._planned(request)
        with self.host.use() as (model, tokenizer):
            decision, seconds, _, _ = self._decide(request, model, tokenizer, question)
        return _decision_pb(decision, seconds)

    @unary
    def Answer(self, request, context):
        from retrieval.plan_service import run

        _, question = self._planned(request)
        with self.host.use() as (model, tokenizer):
            decision, seconds, settings, embedder = self._decide(request, model, tokenizer, question)
            execution = run(self.store, model, tokenizer, decision, question, settings, embedder)
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


def method_handlers(servicer: KVMemServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The service's handlers: generated (de)serializers, except the zero-copy KV streams."""

    def plain(method, request_cls, response_cls):
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request_cls.FromString, response_serializer=response_cls.SerializeToString)

    return {
        "SaveSession": grpc.stream_unary_rpc_method_handler(
            servicer.SaveSession, request_deserializer=wire.deserializer(pb.SaveSessionRequest), response_serializer=pb.SaveSessionResponse.SerializeToString),
        "RestoreSession": grpc.unary_stream_rpc_method_handler(
            servicer.RestoreSession, request_deserializer=pb.RestoreSessionRequest.FromString, response_serializer=wire.serialize),
        "AppendSession": grpc.stream_unary_rpc_method_handler(
            servicer.AppendSession, request_deserializer=wire.deserializer(pb.AppendSessionRequest), response_serializer=pb.AppendSessionResponse.SerializeToString),
        "ForkSession": plain(servicer.ForkSession, pb.ForkSessionRequest, pb.ForkSessionResponse),
        "Lookup": plain(servicer.Lookup, pb.LookupRequest, pb.LookupResponse),
        "GetSession": plain(servicer.GetSession, pb.GetSessionRequest, pb.SessionInfo),
        "ListSessions": plain(servicer.ListSessions, pb.ListSessionsRequest, pb.ListSessionsResponse),
        "DeleteSession": plain(servicer.DeleteSession, pb.DeleteSessionRequest, pb.DeleteSessionResponse),
        "GetStats": plain(servicer.GetStats, pb.GetStatsRequest, pb.GetStatsResponse),
        "Compact": plain(servicer.Compact, pb.CompactRequest, pb.CompactResponse),
        "Retrieve": grpc.unary_stream_rpc_method_handler(
            servicer.Retrieve, request_deserializer=pb.RetrieveRequest.FromString, response_serializer=pb.RetrieveResponse.SerializeToString),
        "SearchText": plain(servicer.SearchText, pb.SearchTextRequest, pb.SearchTextResponse),
        "Plan": plain(servicer.Plan, pb.PlanRequest, pb.Decision),
        "Answer": plain(servicer.Answer, pb.PlanRequest, pb.AnswerResponse),
    }


# ---------------------------------------------------------------------------- composition
class Service:
    """A running kvmem service: store, gRPC server, health, maintenance thread."""

    def __init__(self, config: ServiceConfig, store: SessionStore, server: grpc.Server, port: int, health_servicer: health.HealthServicer, indexer=None, host=None):
        self.config = config
        self.host = host  # kvstore.model_host.ModelHost or None
        self.indexer = indexer
        self.store = store
        self.server = server
        self.port = port
        self.health = health_servicer
        self._stop = threading.Event()
        self._maintenance = threading.Thread(target=self._maintain, name="kvmem-maintenance", daemon=True)

    def start(self) -> "Service":
        self.server.start()
        self._maintenance.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"fields": {"port": self.port, "data_dir": str(self.config.store.data_dir), "durable": self.config.store.durable}})
        return self

    def _maintain(self) -> None:
        while not self._stop.wait(self.config.server.maintenance_seconds):
            try:
                self.store.collect_expired()
                if not self.config.store.durable:
                    self.store.backend.sync()
            except Exception:  # noqa: BLE001 - keep the thread alive, but say what happened
                log.exception("maintenance failed")

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace``, close LMDB cleanly."""
        grace = self.config.server.grace_seconds if grace is None else grace
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._stop.set()
        self.server.stop(grace).wait()
        if self.indexer is not None:
            self.indexer.close()
        self.store.close()
        log.info("stopped", extra={"fields": {"port": self.port}})


def model_cache_dir(config: ServiceConfig) -> Path:
    return Path(config.model.cache_dir) if config.model.cache_dir else Path(config.store.data_dir) / "models"


def create_service(config: ServiceConfig, store: SessionStore | None = None) -> Service:
    """Open the store and bind the gRPC server (port 0 picks a free port). Not started yet.

    The configured model is hosted lazily: it is loaded on the first request that needs it.
    """
    from kvstore.model_host import ModelHost

    store = store or SessionStore.open(config.store)
    import faiss

    faiss.omp_set_num_threads(1)  # searches are one probe at a time: OpenMP wake-ups cost more than they save
    host = ModelHost(config.model.name, model_cache_dir(config)) if config.model.name else None
    limit = config.server.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.server.max_workers, thread_name_prefix="kvmem-rpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit), ("grpc.so_reuseport", 0)],
    )
    indexer = _index_builder(config, store, host) if host is not None and config.retrieval.index_on_save else None
    servicer = KVMemServicer(store, host, config.retrieval, indexer, config.planner)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(servicer)),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{config.server.host}:{config.server.port}")
    if port == 0:
        if indexer is not None:
            indexer.close()
        store.close()
        raise ConfigError(f"cannot bind {config.server.host}:{config.server.port} (in use?)")
    return Service(config, store, server, port, health_servicer, indexer, host)


def _index_builder(config: ServiceConfig, store: SessionStore, host):
    """Background block indexing for sessions of the hosted model (others are indexed on demand
    only when they are retrieved from, which needs their model anyway)."""
    from retrieval.block_index import BlockIndexConfig
    from retrieval.rope import Rope
    from retrieval.service import IndexBuilder

    def rope_for(spec):
        if not host.might_host(spec) or host.spec != spec:
            return None
        with host.use() as (model, _):
            return Rope.from_model(model)

    cfg = config.retrieval
    return IndexBuilder(store, rope_for, BlockIndexConfig(cfg.block_tokens, cfg.representatives, cfg.exact_max_vectors))


def prepare_model(config: ServiceConfig) -> None:
    """Make the configured model available (convert the bundled GGUF once) without loading it."""
    from kvstore.models import BUNDLED_NAME, prepare_model as prepare

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
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config key")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    for flag, key in ((args.host, "server.host"), (args.port, "server.port"), (args.data_dir, "store.data_dir")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        config = load_config(args.config or os.environ.get("KVMEM_CONFIG"), os.environ, overrides)
    except (ConfigError, OSError) as exc:
        print(f"kvmem-server: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.server.log_level, config.server.log_format)
    prepare_model(config)
    service = create_service(config).start()
    if config.server.port_file:
        Path(config.server.port_file).write_text(str(service.port))
    stopping = threading.Event()

    def on_signal(signum, _frame):
        log.info("shutdown requested", extra={"fields": {"signal": signal.Signals(signum).name}})
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
