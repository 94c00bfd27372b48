"""Python client for kvmem, for inference workers and agent frameworks.

    from kvmem.client import Client
    from kvstore.spec import ModelSpec, dtype_name

    client = Client("127.0.0.1:50051", spec=ModelSpec.from_model(model))
    client.save("chat-42", out.cache, input_ids[0])
    restored = client.restore("chat-42", config=model.config)
    model.generate(ids, cache=restored.cache, ...)

Errors arrive as kvmem exceptions (kvstore.errors: NotFound, InvalidRequest, ModelMismatch, ...)
carrying the server's message and the gRPC ``code``.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import grpc
import numpy as np
import torch

from kvmem import convert, wire
from kvmem.status import from_rpc_error
from kvmem.v1 import kvmem_pb2 as pb
from kvmem.v1 import kvmem_pb2_grpc as pb_grpc
from kvstore.errors import Conflict, InvalidRequest
from kvstore.pieces import tensor_raw_view
from kvstore.spec import ModelSpec, dtype_name

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


STREAM_REFERENCES_ABOVE = 4 << 20  # compact(): reference queries larger than this go by CompactStream
REFERENCE_PART_BYTES = 2 << 20  # bytes per ReferencePart message


@dataclass
class RestoredSession:
    """A restored session: ``cache`` goes straight into ``model(...)`` or ``model.generate``.

    token_ids: int64 [T]; positions: int64 [T]; layers: per layer (keys, values) [H_kv, T, D];
    bias: per layer float32 [H_kv, T] for compacted sessions, else None.
    """

    info: pb.SessionInfo
    token_ids: torch.Tensor
    positions: torch.Tensor
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    bias: list[torch.Tensor] | None
    cache: Any
    recalled_tokens: int = 0  # restore(recall_for=...): the last slots are exact tokens recalled from the source
    recall_bytes_read: int = 0  # and the stored bytes the server read to recall them

    @property
    def spec(self) -> ModelSpec:
        return convert.spec_from_pb(self.info.model, stored=True)

    @property
    def logical_length(self) -> int:
        return int(self.info.logical_length)


@dataclass
class Retrieval:
    """header: pb.RetrieveHeader; layers: pb.RetrievedLayer per layer (blocks, scores, entropy);
    kv: layer -> [(token_start, keys [H, n, D], values [H, n, D])] when include_kv was set."""

    header: Any
    layers: list
    kv: dict

    def token_ranges(self, layer: int) -> list[tuple[int, int]]:
        """[start, end) of the blocks retrieved for ``layer``, in score order."""
        entry = self.layers[layer]
        return [(s, s + n) for s, n in zip(entry.block_starts, entry.block_lengths)]


def _translate_errors(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    return wrapper


def _token_list(token_ids: Any) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 2:
            if token_ids.shape[0] != 1:
                raise InvalidRequest(f"token_ids has batch size {token_ids.shape[0]}; kvmem stores one sequence per session")
            token_ids = token_ids[0]
        return token_ids.tolist()
    return [int(t) for t in token_ids]


def _iter_chunks(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int, end: int, offset: int, chunk_tokens: int, bias: Sequence[torch.Tensor] | None) -> Iterator[tuple]:
    """(layer, token_start, n, dtype, keys, values, bias) per (aligned token chunk, layer) of session tokens [start, end).

    layers hold session tokens [offset, offset + T_layer); chunks align to multiples of chunk_tokens
    so that the server can store each one as a block without re-slicing.
    """
    dtype = convert.DTYPE_TO_PB[dtype_name(layers[0][0].dtype)]
    raw = [(tensor_raw_view(k), tensor_raw_view(v)) for k, v in layers]
    raw_bias = [b.detach().to("cpu", torch.float32).contiguous().numpy() for b in bias] if bias is not None else None
    def runs(array: np.ndarray) -> list[memoryview]:  # [H, n, ...] slice -> H contiguous byte runs
        return [memoryview(np.ascontiguousarray(row)).cast("B") for row in array]

    chunk_start = start
    while chunk_start < end:
        chunk_end = min(end, (chunk_start // chunk_tokens + 1) * chunk_tokens)
        lo, hi = chunk_start - offset, chunk_end - offset
        for layer, (keys, values) in enumerate(raw):
            layer_bias = runs(raw_bias[layer][:, lo:hi]) if raw_bias is not None else None
            yield layer, chunk_start, chunk_end - chunk_start, dtype, runs(keys[:, lo:hi]), runs(values[:, lo:hi]), layer_bias
        chunk_start = chunk_end


def _stream(header_message: Any, chunks: Iterator[tuple], request_cls: Any) -> Iterator[Any]:
    """Header message, pre-encoded chunk messages (<= 2 MiB of tensor bytes each), commit."""
    yield header_message
    count = 0

    def counted():
        nonlocal count
        for chunk in chunks:
            count += 1
            yield chunk

    yield from wire.encode_chunk_messages(counted(), convert.MAX_CHUNK_BYTES)
    yield request_cls(commit=pb.Commit(num_chunks=count))


class Client:
    """Blocking client. ``spec`` is the default model spec for calls that need one."""

    def __init__(self, address: str, *, token: str | None = None, tls: Any = None, tenant: str = "", spec: ModelSpec | None = None,
                 timeout: float | None = 600.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        """token: the API key (sent as ``authorization: Bearer``); the server takes the tenant from it.
        tls: None (plaintext), True (system roots), a CA file path, or kvmem.tls.ClientTLS (mutual TLS).
        tenant: "" lets the server decide (the token's tenant, or "default" without auth); admins
        may name any tenant."""
        from kvmem.tls import client_tls

        self.address = address
        self.tenant = tenant
        self.spec = spec
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        secure = client_tls(tls)
        if secure is not None:
            channel = grpc.secure_channel(address, secure.credentials(), options=options + secure.options())
        else:
            channel = grpc.insecure_channel(address, options=options)
        self._channel = channel
        # the API key goes with every call as plain metadata (a Python interceptor cost ~65 us
        # per call in bench/security.py)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = pb_grpc.KVMemStub(self._channel)
        # the KV streams use the zero-copy codec (same wire format as the generated classes)
        self._save = self._channel.stream_unary(wire.SAVE_METHOD, request_serializer=wire.serialize, response_deserializer=pb.SaveSessionResponse.FromString)
        self._append = self._channel.stream_unary(wire.APPEND_METHOD, request_serializer=wire.serialize, response_deserializer=pb.AppendSessionResponse.FromString)
        self._restore_stream = self._channel.unary_stream(wire.RESTORE_METHOD, request_serializer=pb.RestoreSessionRequest.SerializeToString, response_deserializer=wire.deserializer(pb.RestoreSessionResponse))

    @property
    def _call(self) -> dict:
        return {"timeout": self.timeout, "metadata": self._metadata}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spec(self, spec: ModelSpec | None) -> ModelSpec:
        spec = spec or self.spec
        if spec is None:
            raise InvalidRequest("no model spec: pass spec=ModelSpec.from_model(model) to Client(...) or to this call")
        return spec

    # ------------------------------------------------------------------ writes
    @_translate_errors
    def save(
        self,
        session_id: str,
        cache: Any,
        token_ids: Any,
        *,
        spec: ModelSpec | None = None,
        ttl_seconds: int = 0,
        overwrite: bool = False,
        reuse_prefix: bool = True,
        positions: Sequence[int] | None = None,
        logical_length: int = 0,
        bias: Sequence[torch.Tensor] | None = None,
        text: str = "",
        cache_start: int = 0,
    ) -> pb.SaveSessionResponse:
        """Save a cache (DynamicCache or per-layer (keys, values)) for token_ids [T].

        ``text``: the session's text, kept beside it for ``search_text``.

        With ``reuse_prefix`` the client first asks which prefix is already stored and sends only
        the rest (the server shares the stored chunks); if that prefix vanishes meanwhile it
        falls back to sending everything.

        ``cache_start``: the cache holds only tokens [cache_start, T) (a vLLM worker copies out
        just the blocks kvmem lacks); tokens [0, cache_start) must be stored already as a prefix
        of token_ids, else Conflict (nothing is saved, and the caller cannot resend them).
        """
        from kvmem.hf_cache import cache_to_layers

        spec = self._spec(spec)
        layers = cache_to_layers(cache)
        tokens = _token_list(token_ids)
        total = len(tokens)
        if not 0 <= cache_start < total:
            raise InvalidRequest(f"cache_start {cache_start} is not inside the {total} token ids")
        if layers[0][0].shape[1] != total - cache_start:
            raise InvalidRequest(f"cache holds {layers[0][0].shape[1]} tokens but {total - cache_start} were expected "
                                 f"({total} token ids, cache_start {cache_start})")
        plain = positions is None and bias is None
        if cache_start and not (plain and reuse_prefix):
            raise InvalidRequest("cache_start needs reuse_prefix=True and a plain cache (no positions, no bias)")
        lookup = self._stub.Lookup(pb.LookupRequest(tenant=self.tenant, model=convert.spec_to_pb(spec), token_ids=tokens), **self._call)
        chunk_tokens = lookup.chunk_tokens
        reuse = 0
        if reuse_prefix and plain:
            reuse = lookup.matched_tokens if lookup.matched_tokens == total else (lookup.matched_tokens // chunk_tokens) * chunk_tokens
        if reuse < cache_start:
            raise Conflict(f"only {lookup.matched_tokens} of the first {cache_start} tokens are stored (the prefix changed); "
                           "save the whole cache (cache_start=0)")
        header = pb.SaveHeader(
            tenant=self.tenant, session_id=session_id, model=convert.spec_to_pb(spec), token_ids=tokens,
            positions=list(positions) if positions is not None else [], logical_length=logical_length,
            has_bias=bias is not None, ttl_seconds=ttl_seconds, overwrite=overwrite, reuse_prefix_tokens=reuse, text=text,
        )

        def send(reuse_tokens: int) -> pb.SaveSessionResponse:
            header.reuse_prefix_tokens = reuse_tokens
            chunks = _iter_chunks(layers, reuse_tokens, total, cache_start, chunk_tokens, bias)
            return self._save(_stream(pb.SaveSessionRequest(header=header), chunks, pb.SaveSessionRequest), **self._call)

        try:
            return send(reuse)
        except grpc.RpcError as exc:
            if reuse and not cache_start and exc.code() == grpc.StatusCode.ABORTED:
                return send(0)
            raise

    @_translate_errors
    def append(self, session_id: str, cache: Any, new_token_ids: Any, *, spec: ModelSpec | None = None, ttl_seconds: int = 0, check_length: bool = True, text: str = "") -> pb.AppendSessionResponse:
        """Append the last n tokens of ``cache`` (n = len(new_token_ids)) to a stored session.

        The cache's earlier tokens are assumed to be the stored session; with ``check_length``
        the server refuses (Conflict) if the session does not hold exactly that many tokens.
        """
        from kvmem.hf_cache import cache_to_layers

        spec = self._spec(spec)
        layers = cache_to_layers(cache)
        tokens = _token_list(new_token_ids)
        total = int(layers[0][0].shape[1])
        old = total - len(tokens)
        if old < 0 or not tokens:
            raise InvalidRequest(f"cache holds {total} tokens; cannot append {len(tokens)} new ones from it")
        info = self.get(session_id)
        if check_length and info.num_tokens != old:
            raise Conflict(f"session {session_id!r} holds {info.num_tokens} tokens but the cache implies {old}; restore it first")
        header = pb.AppendHeader(tenant=self.tenant, session_id=session_id, model=convert.spec_to_pb(spec), token_ids=tokens, ttl_seconds=ttl_seconds, text=text)
        if check_length:
            header.expected_num_tokens = old
        offset = info.num_tokens - old
        chunks = _iter_chunks(layers, info.num_tokens, info.num_tokens + len(tokens), offset, 256, None)
        return self._append(_stream(pb.AppendSessionRequest(header=header), chunks, pb.AppendSessionRequest), **self._call)

    @_translate_errors
    def fork(self, source_session_id: str, target_session_id: str, at_token: int | None = None, *, ttl_seconds: int = 0, overwrite: bool = False) -> pb.ForkSessionResponse:
        request = pb.ForkSessionRequest(tenant=self.tenant, source_session_id=source_session_id, target_session_id=target_session_id, ttl_seconds=ttl_seconds, overwrite=overwrite)
        if at_token is not None:
            request.at_token = at_token
        return self._stub.ForkSession(request, **self._call)

    @_translate_errors
    def delete(self, session_id: str) -> int:
        """Delete a session; returns bytes freed."""
        return self._stub.DeleteSession(pb.DeleteSessionRequest(tenant=self.tenant, session_id=session_id), **self._call).bytes_freed

    # ------------------------------------------------------------------ reads
    @_translate_errors
    def restore(self, session_id: str, *, spec: ModelSpec | None = None, start: int = 0, end: int = 0, config: Any = None, model: Any = None, device: str | torch.device = "cpu", build_cache: bool = True,
                recall_for: Any = None, recall_tokens: int = 0) -> RestoredSession:
        """Restore tokens [start, end) of a session into a cache for ``model.generate``.

        Plain sessions become a DynamicCache (``config``: the model's config). Compacted sessions
        need ``model``: their cache (a CompactedCache) carries attention biases and the original
        length, and installs kvmem's bias-aware attention on the model. ``build_cache=False``
        returns only the tensors (``cache`` is None).

        ``recall_for`` (compacted sessions): the question's token ids, as they will follow the
        context. The server recalls ``recall_tokens`` (0: its setting, 256 by default) exact tokens
        per layer for it from the session's lossless source and returns them after the compacted
        slots, so ``model.generate`` on the cache sees the details compaction dropped.
        """
        recall = _token_list(recall_for) if recall_for is not None else []
        if recall_for is not None and not recall:
            raise InvalidRequest("recall_for is empty; give the question's token ids")
        request = pb.RestoreSessionRequest(tenant=self.tenant, session_id=session_id, token_start=start, token_end=end, recall_for=recall,
                                           recall_tokens=recall_tokens)
        if spec or self.spec:
            request.model.CopyFrom(convert.spec_to_pb(self._spec(spec)))
        return self._restore(request, config if model is None else model.config, device, model, build_cache)

    @_translate_errors
    def restore_prefix(self, token_ids: Any, *, spec: ModelSpec | None = None, start: int = 0, end: int = 0, config: Any = None,
                       device: str | torch.device = "cpu", build_cache: bool = True) -> RestoredSession:
        """Restore the longest stored prefix of token_ids (NotFound if none is stored).

        ``start``/``end`` narrow it to tokens [start, end) of that prefix (end 0 = all of it); the
        result may stop early where the stored prefix does (``len(result.token_ids)`` says where),
        and NotFound means nothing is stored at ``start``."""
        return self._restore(self._prefix_request(token_ids, spec, start, end), config, device, None, build_cache)

    def _prefix_request(self, token_ids: Any, spec: ModelSpec | None, start: int, end: int) -> pb.RestoreSessionRequest:
        return pb.RestoreSessionRequest(tenant=self.tenant, model=convert.spec_to_pb(self._spec(spec)), lookup_token_ids=_token_list(token_ids),
                                        token_start=start, token_end=end)

    def _restore_chunks(self, request: pb.RestoreSessionRequest) -> tuple[Any, Iterator[Any]]:
        """(header, chunks): the stream's header, then its chunks as they arrive; the iterator
        raises InvalidRequest if the stream ends before the header's num_chunks."""
        parts = self._restore_stream(request, **self._call)
        first = next(parts)
        if first.kind != "header":
            raise InvalidRequest(f"restore stream began with a {first.kind or 'empty'} message instead of its header")
        header = first.message

        def chunks() -> Iterator[Any]:
            received = 0
            for part in parts:
                if part.kind != "chunks":
                    raise InvalidRequest(f"unexpected {part.kind or 'empty'} message in the restore stream ({part.message})")
                for chunk in part.chunks:
                    received += 1
                    yield chunk
            if received != header.num_chunks:
                raise InvalidRequest(f"restore stream ended after {received} of {header.num_chunks} chunks")

        return header, chunks()

    @_translate_errors
    def restore_prefix_into(self, token_ids: Any, write: Any, *, spec: ModelSpec | None = None, start: int = 0, end: int = 0) -> tuple[int, int]:
        """Stream tokens [start, end) of the stored prefix of token_ids into ``write(layer,
        token_start, keys, values)`` (keys/values: read-only tensors [H, n, D] over the received
        bytes, valid during the call) without assembling the whole cache; returns the token
        range [start, got) delivered. A vLLM worker writes each chunk straight into its paged
        buffers. If it raises, some chunks may have been written already."""
        header, chunks = self._restore_chunks(self._prefix_request(token_ids, spec, start, end))
        if list(header.token_ids) != _token_list(token_ids)[header.token_start : header.token_end]:
            raise InvalidRequest("the restore stream's token ids are not the ones asked for")
        stored = convert.spec_from_pb(header.session.model, stored=True)
        dtype = stored.torch_dtype
        heads, dim = stored.num_kv_heads, stored.head_dim
        itemsize = torch.empty((), dtype=dtype).element_size()
        for chunk in chunks:
            shape = (heads, chunk.num_tokens, dim)
            expected = heads * chunk.num_tokens * dim * itemsize
            if not (header.token_start <= chunk.token_start and chunk.token_start + chunk.num_tokens <= header.token_end
                    and chunk.layer < stored.num_layers and len(chunk.keys) == len(chunk.values) == expected and expected):
                raise InvalidRequest(f"restore chunk (layer {chunk.layer}, tokens {chunk.token_start}+{chunk.num_tokens}) does not fit the stream's header")
            with warnings.catch_warnings():  # read-only views of the received bytes; ``write`` only reads them
                warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
                keys = torch.frombuffer(chunk.keys, dtype=dtype).view(shape)
                values = torch.frombuffer(chunk.values, dtype=dtype).view(shape)
            write(chunk.layer, chunk.token_start, keys, values)
        return int(header.token_start), int(header.token_end)

    def _restore(self, request: pb.RestoreSessionRequest, config: Any, device: str | torch.device, model: Any, build_cache: bool = True) -> RestoredSession:
        from kvmem.hf_cache import layers_to_cache

        header, chunks = self._restore_chunks(request)
        spec = convert.spec_from_pb(header.session.model, stored=True)
        count = header.token_end - header.token_start
        shape = (spec.num_kv_heads, count, spec.head_dim)
        layers = [(torch.empty(shape, dtype=spec.torch_dtype), torch.empty(shape, dtype=spec.torch_dtype)) for _ in range(spec.num_layers)]
        raw = [(tensor_raw_view(k), tensor_raw_view(v)) for k, v in layers]  # writable views of the same memory
        bias = [torch.empty(shape[:2], dtype=torch.float32) for _ in range(spec.num_layers)] if header.session.has_bias else None
        raw_bias = [b.numpy() for b in bias] if bias is not None else None
        for chunk in chunks:
            lo = chunk.token_start - header.token_start
            hi = lo + chunk.num_tokens
            keys, values = raw[chunk.layer]
            piece_shape = (shape[0], chunk.num_tokens, shape[2])
            keys[:, lo:hi] = np.frombuffer(chunk.keys, dtype=keys.dtype).reshape(piece_shape)
            values[:, lo:hi] = np.frombuffer(chunk.values, dtype=values.dtype).reshape(piece_shape)
            if raw_bias is not None:
                raw_bias[chunk.layer][:, lo:hi] = np.frombuffer(chunk.bias, dtype="<f4").reshape(shape[0], chunk.num_tokens)
        if torch.device(device).type != "cpu":
            layers = [(k.to(device, non_blocking=True), v.to(device, non_blocking=True)) for k, v in layers]
            bias = [b.to(device) for b in bias] if bias is not None else None
        compacted = header.session.has_bias or header.session.logical_length != header.session.num_tokens
        if not build_cache:
            cache = None
        elif compacted and request.token_start == 0 and request.token_end in (0, header.session.num_tokens):
            if model is None:
                raise InvalidRequest(f"session {header.session.session_id!r} is compacted: pass model=... to restore() so its cache can apply the attention biases")
            from compaction.inference import CompactedCache

            cache = CompactedCache.for_model(model, layers, bias or [None] * len(layers), header.session.logical_length)
        else:
            cache = layers_to_cache(layers, config)
        return RestoredSession(
            info=header.session,
            token_ids=torch.tensor(list(header.token_ids), dtype=torch.long),
            positions=torch.tensor(list(header.positions), dtype=torch.long),
            layers=layers,
            bias=bias,
            cache=cache,
            recalled_tokens=int(header.recalled_tokens),
            recall_bytes_read=int(header.recall_bytes_read),
        )

    @_translate_errors
    def compact(
        self,
        session_id: str,
        method: str = "attention_matching",
        *,
        ratio: float = 0.0,
        budget: int = 0,
        target_session_id: str = "",
        replace: bool = False,
        queries: Sequence[torch.Tensor] | None = None,
        held_out: Sequence[torch.Tensor] | None = None,
        options: dict[str, Any] | None = None,
        overwrite: bool = False,
        drop_source: bool = False,
    ) -> pb.CompactResponse:
        """Compact a stored session (give ratio or budget). ``queries``/``held_out``: per layer
        [Hq, n, D] post-RoPE reference queries; without them the server uses its hosted model.
        ``replace`` keeps the original as "<session_id>@source" unless ``drop_source``;
        ``overwrite`` replaces an existing target."""
        request = pb.CompactRequest(
            tenant=self.tenant, session_id=session_id, method=method, ratio=ratio, budget=budget,
            target_session_id=target_session_id, replace=replace, options={k: str(v) for k, v in (options or {}).items()},
            overwrite=overwrite, drop_source=drop_source,
        )
        sizes = sum(4 * t.numel() for group in (queries, held_out) if group is not None for t in group)
        if sizes > STREAM_REFERENCES_ABOVE:  # larger than a message may be: stream them in pieces (CompactStream)
            from kvmem.reference_stream import reference_parts

            def messages():
                yield pb.CompactStreamRequest(request=request)
                for tensors, is_held_out in ((queries, False), (held_out, True)):
                    if tensors is not None:
                        for part in reference_parts(tensors, is_held_out, REFERENCE_PART_BYTES):
                            yield pb.CompactStreamRequest(references=part)

            return self._stub.CompactStream(messages(), **self._call)
        for field, tensors in (("queries", queries), ("held_out", held_out)):
            if tensors is not None:
                message = getattr(request, field)
                message.num_query_heads, message.num_queries = tensors[0].shape[0], tensors[0].shape[1]
                message.layers.extend(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes() for t in tensors)
        return self._stub.Compact(request, **self._call)

    @_translate_errors
    def retrieve(
        self,
        session_id: str,
        budget_tokens: int,
        *,
        token_ids: Any = None,
        text: str = "",
        query_vectors: Sequence[torch.Tensor] | None = None,
        method: str = "actqkv",
        include_kv: bool = False,
        dynamic_budget: bool = True,
    ) -> "Retrieval":
        """The KV blocks of a stored session that matter for a query (give one of token_ids, text,
        or per layer position-free query states [Hq, n, D]). With ``include_kv`` the keys and
        values of every selected token come back too (``Retrieval.layers``)."""
        request = pb.RetrieveRequest(
            tenant=self.tenant, session_id=session_id, budget_tokens=budget_tokens, method=method,
            include_kv=include_kv, dynamic_budget=dynamic_budget, query_text=text,
        )
        if token_ids is not None:
            request.query_token_ids.extend(_token_list(token_ids))
        if query_vectors is not None:
            request.query_vectors.num_query_heads, request.query_vectors.num_queries = query_vectors[0].shape[0], query_vectors[0].shape[1]
            request.query_vectors.layers.extend(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes() for t in query_vectors)
        stream = self._stub.Retrieve(request, **self._call)
        first = next(stream)
        if first.WhichOneof("part") != "header":
            raise InvalidRequest("retrieve stream began without its header")
        header = first.header
        spec = convert.spec_from_pb(header.session.model, stored=True)
        result = Retrieval(header, [], {})
        for message in stream:
            kind = message.WhichOneof("part")
            if kind == "layer":
                result.layers.append(message.layer)
            elif kind == "chunks":
                for chunk in message.chunks.chunks:
                    shape = (spec.num_kv_heads, chunk.num_tokens, spec.head_dim)
                    keys = torch.frombuffer(bytearray(chunk.keys), dtype=spec.torch_dtype).view(shape)
                    values = torch.frombuffer(bytearray(chunk.values), dtype=spec.torch_dtype).view(shape)
                    result.kv.setdefault(chunk.layer, []).append((chunk.token_start, keys, values))
        if sum(len(v) for v in result.kv.values()) != header.num_chunks:
            raise InvalidRequest(f"retrieve stream ended after {sum(len(v) for v in result.kv.values())} of {header.num_chunks} KV chunks")
        return result

    @_translate_errors
    def search_text(self, session_id: str, query: str, k: int = 5) -> pb.SearchTextResponse:
        """Top-k passages of the session's saved text for ``query``."""
        return self._stub.SearchText(pb.SearchTextRequest(tenant=self.tenant, session_id=session_id, query=query, k=k), **self._call)

    def _plan_request(self, session_id: str, query: str, latency_budget_s: float | None, force: str, forbid: Sequence[str],
                      expected_followups: int, max_new_tokens: int, budgets: dict[str, int] | None = None) -> pb.PlanRequest:
        return pb.PlanRequest(
            tenant=self.tenant, session_id=session_id, query=query, latency_budget_ms=int(round(latency_budget_s * 1000)) if latency_budget_s else 0,
            force_option=force, forbid_options=list(forbid), expected_followups=expected_followups, max_new_tokens=max_new_tokens,
            **(budgets or {}),
        )

    @_translate_errors
    def plan(self, session_id: str, query: str, *, latency_budget_s: float | None = None, force: str = "", forbid: Sequence[str] = (),
             expected_followups: int = 0) -> pb.Decision:
        """How the server would answer ``query`` (text appended after the session's context) and
        why: every option's estimated cost and quality, what was ruled out, the choice. Runs nothing."""
        request = self._plan_request(session_id, query, latency_budget_s, force, forbid, expected_followups, 0)
        return self._stub.Plan(request, **self._call)

    @_translate_errors
    def answer(self, session_id: str, query: str, *, latency_budget_s: float | None = None, force: str = "", forbid: Sequence[str] = (),
               expected_followups: int = 0, max_new_tokens: int = 24, rag_budget_tokens: int = 0, kv_budget_tokens: int = 0,
               recall_budget_tokens: int = 0) -> pb.AnswerResponse:
        """Decide, run the chosen option on the server's model, and return the generated answer
        with its decision record and the measured seconds per stage. The budgets (0: the server's
        settings) set, for this request, the text tokens rag puts in context, the tokens per layer
        kv_retrieval attends to, and the exact tokens per layer compacted_recall recalls."""
        budgets = {"rag_budget_tokens": rag_budget_tokens, "kv_budget_tokens": kv_budget_tokens, "recall_budget_tokens": recall_budget_tokens}
        request = self._plan_request(session_id, query, latency_budget_s, force, forbid, expected_followups, max_new_tokens, budgets)
        return self._stub.Answer(request, **self._call)

    @_translate_errors
    def lookup(self, token_ids: Any, *, spec: ModelSpec | None = None) -> int:
        """How many leading tokens are already stored for this tenant and model."""
        return self.lookup_chunked(token_ids, spec=spec)[0]

    @_translate_errors
    def lookup_chunked(self, token_ids: Any, *, spec: ModelSpec | None = None, timeout: float | None = None) -> tuple[int, int]:
        """(matched tokens, the store's chunk size in tokens): a save that reuses the prefix starts
        at a multiple of the chunk size. ``timeout`` overrides the client's for this call."""
        request = pb.LookupRequest(tenant=self.tenant, model=convert.spec_to_pb(self._spec(spec)), token_ids=_token_list(token_ids))
        call = self._call if timeout is None else {**self._call, "timeout": timeout}
        response = self._stub.Lookup(request, **call)
        return int(response.matched_tokens), int(response.chunk_tokens)

    @_translate_errors
    def get(self, session_id: str) -> pb.SessionInfo:
        return self._stub.GetSession(pb.GetSessionRequest(tenant=self.tenant, session_id=session_id), **self._call)

    @_translate_errors
    def list_page(self, page_size: int = 100, page_token: str = "") -> pb.ListSessionsResponse:
        return self._stub.ListSessions(pb.ListSessionsRequest(tenant=self.tenant, page_size=page_size, page_token=page_token), **self._call)

    def list(self, page_size: int = 100) -> Iterator[pb.SessionInfo]:
        """Every session of the tenant, fetching pages as needed."""
        token = ""
        while True:
            page = self.list_page(page_size, token)
            yield from page.sessions
            token = page.next_page_token
            if not token:
                return

    @_translate_errors
    def stats(self, tenant: str | None = None) -> pb.GetStatsResponse:
        """Totals (admins, servers without auth) and ``usage`` of the caller's tenant (or, for an
        admin, of ``tenant``)."""
        return self._stub.GetStats(pb.GetStatsRequest(tenant=self.tenant if tenant is None else tenant), **self._call)

    @_translate_errors
    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's channel is ready (raises on timeout)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
