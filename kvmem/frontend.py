"""The trusted front end: every call passes here before it reaches the store.

Per call, in order: decode the request in our own code (undecodable bytes are INVALID_ARGUMENT,
never INTERNAL), identify the caller (bearer token or client certificate; UNAUTHENTICATED
otherwise), admit streams within the per-tenant and per-connection limits, run the domain work
on a thread pool (the event loop only waits, so an idle stream holds no thread), end streams
that stay silent past ``stream_idle_timeout_s``, map errors to status codes with the error class
in the ``kvmem-error`` trailing metadata, and write one audit line per state-changing call.

Threading: the gRPC server is ``grpc.aio`` on one event loop; CPU and disk work (decoding
chunks into buffers, LMDB transactions, model runs) goes to ``pool``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from kvmem import wire
from kvmem.admission import StreamLimits
from kvmem.auth import Identity, KeyRing, bearer_token
from kvmem.convert import DEFAULT_TENANT
from kvmem.status import ERROR_METADATA_KEY, code_for, error_class
from kvmem.v1 import kvmem_pb2 as pb
from kvstore.errors import InvalidRequest, KvmemError, PermissionDenied, TimedOut, Unauthenticated

log = logging.getLogger("kvmem.server")
audit_log = logging.getLogger("kvmem.audit")
SERVICE_NAME = "kvmem.v1.KVMem"
IDENTITY_ERRORS = {Unauthenticated: "unauthenticated", PermissionDenied: "permission_denied"}  # -> auth failure metric label
STATE_CHANGING = frozenset({"SaveSession", "AppendSession", "ForkSession", "DeleteSession", "Compact", "CompactStream"})


@dataclass
class Malformed:
    """A request whose bytes did not decode as its message type."""

    error: str


def safe_deserializer(message_cls: Any) -> Callable[[bytes], Any]:
    """FromString that returns Malformed instead of raising (gRPC would answer INTERNAL)."""
    name = message_cls.DESCRIPTOR.name

    def decode(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - every decoding failure is the client's
            return Malformed(f"the request is not a valid {name} message ({type(exc).__name__}: {exc})")

    return decode


@dataclass
class Call:
    """One RPC: who calls, from where, and what the audit line reports."""

    method: str
    identity: Identity | None  # None when auth is off (trusted network)
    peer: str
    session: str = ""
    tenant: str = ""
    bytes: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def tenant_for(self, requested: str) -> str:
        """The tenant the call acts for: from the identity, never from the request alone."""
        if self.identity is None:
            self.tenant = requested or DEFAULT_TENANT
        elif not requested or requested == self.identity.tenant:
            self.tenant = self.identity.tenant
        elif self.identity.is_admin:
            self.tenant = requested
        else:
            raise PermissionDenied(
                f"key {self.identity.key_id} belongs to tenant {self.identity.tenant!r} and may not act for another tenant; "
                "leave the tenant field empty or use that tenant's key"
            )
        return self.tenant

    @property
    def is_admin(self) -> bool:
        return self.identity is None or self.identity.is_admin


@dataclass(frozen=True)
class FrontEndSettings:
    stream_idle_timeout_s: float = 30.0
    max_streams_per_tenant: int = 64
    max_streams_per_connection: int = 32
    max_reference_bytes: int = 1 << 30  # streamed reference queries one CompactStream may hold


class FrontEnd:
    """Async gRPC handlers around a synchronous domain servicer (server.KVMemServicer)."""

    def __init__(self, servicer, pool, keyring: KeyRing | None, settings: FrontEndSettings, client_certificates: bool = False, metrics=None):
        """keyring: API keys (None = no keys file). client_certificates: mutual TLS is on, so a
        verified certificate identifies its caller even without a keys file."""
        self.servicer = servicer
        self.pool = pool
        self.keyring = keyring
        self.client_certificates = client_certificates
        self.metrics = metrics  # kvmem.metrics.Metrics or None
        self.idle = settings.stream_idle_timeout_s
        self.max_reference_bytes = settings.max_reference_bytes
        self.limits = StreamLimits(settings.max_streams_per_tenant, settings.max_streams_per_connection)

    # ------------------------------------------------------------------ plumbing
    async def _run(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def _identify(self, context: grpc.aio.ServicerContext) -> Identity | None:
        if self.keyring is None and not self.client_certificates:
            return None  # auth off: a trusted network
        token = bearer_token(context.invocation_metadata())
        if token and self.keyring is not None:
            identity = self.keyring.identify_token(token)
            if identity is None:
                raise Unauthenticated("unknown or revoked token; ask the operator for a key (`kvmem keys add`)")
            return identity
        if token is None and self.client_certificates:
            auth = context.auth_context() or {}
            names = auth.get("x509_common_name") or []
            if names:
                common_name = names[0].decode("utf-8", "replace")
                if self.keyring is not None:
                    return self.keyring.identify_certificate(common_name)
                return Identity(common_name, f"cert:{common_name}", "tenant")
        raise Unauthenticated("this server requires credentials: send `authorization: Bearer <token>` metadata (Client(token=...), KVMEM_TOKEN) or a client certificate")

    def _admit(self, call: Call, context, request=None) -> None:
        """Set the call's identity (or raise UNAUTHENTICATED); then refuse a request that did not decode."""
        call.identity = self._identify(context)
        if isinstance(request, Malformed):
            raise InvalidRequest(request.error)

    async def _fail(self, context, call: Call, exc: BaseException) -> None:
        if isinstance(exc, KvmemError):
            code, message, name = code_for(exc), str(exc), error_class(exc).__name__
            log.info("request failed", extra={"fields": {"method": call.method, "code": code.name, "error": message}})
        else:
            request_id = uuid.uuid4().hex[:12]
            code, name = grpc.StatusCode.INTERNAL, "Internal"
            message = f"internal error (request id {request_id}); the server log has the details"
            log.error("internal error", extra={"fields": {"method": call.method, "request_id": request_id, "traceback": "".join(traceback.format_exception(exc))}})
        self._done(call, code.name)
        if self.metrics is not None and type(exc) in IDENTITY_ERRORS:
            self.metrics.auth_failures.labels(IDENTITY_ERRORS[type(exc)]).inc()
        await context.abort(code, message, trailing_metadata=((ERROR_METADATA_KEY, name),))

    def _done(self, call: Call, outcome: str) -> None:
        """The call ended with ``outcome`` (a status code name): metrics and the audit line."""
        if self.metrics is not None:
            self.metrics.requests.labels(call.method, outcome).inc()
            self.metrics.latency.labels(call.method).observe(time.perf_counter() - call.started)
        if call.method not in STATE_CHANGING:
            return
        audit_log.info("audit", extra={"fields": {
            "audit": True, "rpc": call.method, "tenant": call.tenant, "key_id": call.identity.key_id if call.identity else "",
            "session": call.session, "outcome": outcome, "bytes": call.bytes, "peer": call.peer,
        }})

    async def _read(self, context, what: str):
        try:
            message = await asyncio.wait_for(context.read(), self.idle)
        except asyncio.TimeoutError:
            raise TimedOut(f"{what}: no message for {self.idle:g} s (server.stream_idle_timeout_s); the stream was ended and nothing was stored") from None
        return None if message is grpc.aio.EOF else message

    async def _write(self, context, message, what: str) -> None:
        try:
            if hasattr(asyncio, "timeout"):  # 3.11+: no task per write (a Retrieve writes 31 messages)
                async with asyncio.timeout(self.idle):
                    await context.write(message)
            else:
                await asyncio.wait_for(context.write(message), self.idle)
        except asyncio.TimeoutError:
            raise TimedOut(f"{what}: the client read nothing for {self.idle:g} s (server.stream_idle_timeout_s); the stream was ended") from None

    # ------------------------------------------------------------------ handler shapes
    def unary(self, method: str, fn: Callable) -> Callable:
        async def handler(request, context):
            call = Call(method, None, context.peer() or "")
            try:
                self._admit(call, context, request)
                response = await self._run(fn, call, request)
                self._done(call, "OK")
                return response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                await self._fail(context, call, exc)

        return handler

    def server_stream(self, method: str, fn: Callable) -> Callable:
        """fn(call, request) -> iterator of response messages (its steps run on the pool)."""

        async def handler(request, context):
            call = Call(method, None, context.peer() or "")
            try:
                self._admit(call, context, request)
                tenant = call.tenant_for(getattr(request, "tenant", ""))
                with self.limits.hold(tenant, call.peer):
                    messages: Iterator = await self._run(fn, call, request)
                    while True:
                        batch, error = await self._run(_next_batch, messages)
                        for message in batch:
                            await self._write(context, message, method)
                        if error is not None:
                            raise error
                        if not batch:
                            break
                self._done(call, "OK")
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, call, exc)

        return handler

    def client_stream(self, method: str, open_fn: Callable, commit_fn: Callable) -> Callable:
        """Header -> open_fn(call, header) -> pending with .pieces; chunks are added on the pool;
        Commit -> commit_fn(call, pending). Anything else, silence, or an early end stores nothing."""

        async def handler(request_iterator, context):
            call = Call(method, None, context.peer() or "")
            try:
                self._admit(call, context)
                first = await self._read(context, method)
                part = first if first is None else wire.as_part(first)
                if part is None or part.kind == "malformed":
                    raise InvalidRequest(f"the first message of {method} must be its header" + (f" ({part.message})" if part is not None else ""))
                if part.kind != "header":
                    raise InvalidRequest(f"the first message of {method} must be its header, not {part.kind or 'an empty message'}")
                tenant = call.tenant_for(part.message.tenant)
                call.session = part.message.session_id
                with self.limits.hold(tenant, call.peer):
                    pending = await self._run(open_fn, call, part.message)
                    try:
                        await self._collect(context, method, pending.pieces)
                        response = await self._run(commit_fn, call, pending)
                    except BaseException:
                        # staged blocks of a refused, cancelled or idle stream are removed now
                        # (the periodic sweep catches whatever this cannot, e.g. at shutdown)
                        await asyncio.shield(self._run(_abort, pending.pieces))
                        raise
                self._done(call, "OK")
                return response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, call, exc)

        return handler

    def request_then_parts(self, method: str, fn: Callable) -> Callable:
        """CompactStream: a CompactRequest, then ReferencePart messages until the client ends the
        stream; fn(call, request, assembler) runs on the pool. Bounded by max_reference_bytes and
        by the stream limits; silence past the idle timeout ends it."""
        from kvmem.reference_stream import ReferenceAssembler

        async def handler(request_iterator, context):
            call = Call(method, None, context.peer() or "")
            try:
                self._admit(call, context)
                first = await self._read(context, method)
                if isinstance(first, Malformed):
                    raise InvalidRequest(first.error)
                if first is None or first.WhichOneof("part") != "request":
                    raise InvalidRequest(f"the first message of {method} must be its request")
                request = first.request
                tenant = call.tenant_for(request.tenant)
                call.session = request.session_id
                with self.limits.hold(tenant, call.peer):
                    assembler = ReferenceAssembler(self.max_reference_bytes)
                    while (message := await self._read(context, method)) is not None:
                        if isinstance(message, Malformed):
                            raise InvalidRequest(f"{message.error}; nothing was compacted")
                        if message.WhichOneof("part") != "references":
                            raise InvalidRequest(f"after its request, {method} takes only reference parts; nothing was compacted")
                        assembler.add(message.references)
                    response = await self._run(fn, call, request, assembler)
                self._done(call, "OK")
                return response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, call, exc)

        return handler

    async def _collect(self, context, method: str, pieces) -> None:
        received = 0
        while True:
            message = await self._read(context, method)
            if message is None:
                raise InvalidRequest("the stream ended before its commit message; nothing was stored")
            part = wire.as_part(message)
            if part.kind == "chunks":
                await self._run(_add_chunks, pieces, part.chunks)
                received += len(part.chunks)
            elif part.kind == "commit":
                if part.message.num_chunks != received:
                    raise InvalidRequest(f"commit says {part.message.num_chunks} chunks were sent but {received} arrived; nothing was stored")
                return
            elif part.kind == "malformed":
                raise InvalidRequest(f"malformed stream message ({part.message}); nothing was stored")
            else:
                raise InvalidRequest(f"unexpected {part.kind or 'empty'} message after the header; send chunks, then one commit")

    # ------------------------------------------------------------------ the service
    def _counted(self, method: str, decode: Callable, encode: Callable) -> tuple[Callable, Callable]:
        """(de)serializers that count the bytes of ``method`` in the metrics."""
        if self.metrics is None:
            return decode, encode
        received, sent = self.metrics.received.labels(method), self.metrics.sent.labels(method)

        def counted_decode(data: bytes):
            received.inc(len(data))
            return decode(data)

        def counted_encode(message) -> bytes:
            data = encode(message)
            sent.inc(len(data))
            return data

        return counted_decode, counted_encode

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        s = self.servicer
        table = self._handler_table(s)
        for name, handler in table.items():
            decode, encode = self._counted(name, handler.request_deserializer, handler.response_serializer)
            table[name] = handler._replace(request_deserializer=decode, response_serializer=encode)
        return table

    def _handler_table(self, s) -> dict[str, grpc.RpcMethodHandler]:
        def plain(name, request_cls, response_cls, fn):
            return grpc.unary_unary_rpc_method_handler(self.unary(name, fn), request_deserializer=safe_deserializer(request_cls), response_serializer=response_cls.SerializeToString)

        return {
            "SaveSession": grpc.stream_unary_rpc_method_handler(
                self.client_stream("SaveSession", s.open_save, s.commit_save),
                request_deserializer=wire.deserializer(pb.SaveSessionRequest), response_serializer=pb.SaveSessionResponse.SerializeToString),
            "AppendSession": grpc.stream_unary_rpc_method_handler(
                self.client_stream("AppendSession", s.open_append, s.commit_append),
                request_deserializer=wire.deserializer(pb.AppendSessionRequest), response_serializer=pb.AppendSessionResponse.SerializeToString),
            "RestoreSession": grpc.unary_stream_rpc_method_handler(
                self.server_stream("RestoreSession", s.restore), request_deserializer=safe_deserializer(pb.RestoreSessionRequest), response_serializer=wire.serialize),
            "Retrieve": grpc.unary_stream_rpc_method_handler(
                self.server_stream("Retrieve", s.retrieve), request_deserializer=safe_deserializer(pb.RetrieveRequest), response_serializer=wire.serialize),
            "ForkSession": plain("ForkSession", pb.ForkSessionRequest, pb.ForkSessionResponse, s.fork),
            "Lookup": plain("Lookup", pb.LookupRequest, pb.LookupResponse, s.lookup),
            "GetSession": plain("GetSession", pb.GetSessionRequest, pb.SessionInfo, s.get_session),
            "ListSessions": plain("ListSessions", pb.ListSessionsRequest, pb.ListSessionsResponse, s.list_sessions),
            "DeleteSession": plain("DeleteSession", pb.DeleteSessionRequest, pb.DeleteSessionResponse, s.delete_session),
            "GetStats": plain("GetStats", pb.GetStatsRequest, pb.GetStatsResponse, s.get_stats),
            "Compact": plain("Compact", pb.CompactRequest, pb.CompactResponse, s.compact),
            "CompactStream": grpc.stream_unary_rpc_method_handler(
                self.request_then_parts("CompactStream", s.compact_streamed),
                request_deserializer=safe_deserializer(pb.CompactStreamRequest), response_serializer=pb.CompactResponse.SerializeToString),
            "SearchText": plain("SearchText", pb.SearchTextRequest, pb.SearchTextResponse, s.search_text),
            "Plan": plain("Plan", pb.PlanRequest, pb.Decision, s.plan),
            "Answer": plain("Answer", pb.PlanRequest, pb.AnswerResponse, s.answer),
        }


def _next_batch(messages: Iterator, max_bytes: int = 1 << 20, max_count: int = 64) -> tuple[list, BaseException | None]:
    """The stream's next messages, as many as fit in about ``max_bytes`` (at least one; none at its
    end), made in one pool hop: a Retrieve's 30 small layer messages cost one thread hand-off, not
    30, while a stream of MB-sized KV chunks still goes one message at a time. An error after some
    messages comes back with them, to be raised once they are written."""
    batch, size = [], 0
    try:
        for message in messages:
            batch.append(message)
            size += len(message) if isinstance(message, (bytes, bytearray, memoryview)) else message.ByteSize()  # pre-encoded (kvmem.wire) or a message
            if size >= max_bytes or len(batch) >= max_count:
                break
    except Exception as exc:  # noqa: BLE001
        if not batch:
            raise
        return batch, exc
    return batch, None


def _abort(write) -> None:
    try:
        write.abort()
    except Exception:  # noqa: BLE001 - the sweep removes what could not be removed here
        log.exception("could not drop the staged blocks of an aborted write")


def _add_chunks(pieces, chunks) -> None:
    for chunk in chunks:
        pieces.add(chunk.layer, chunk.token_start, chunk.num_tokens, chunk.dtype, chunk.keys, chunk.values, chunk.bias if len(chunk.bias) else None)

