"""The wire contract from outside, as a hostile caller (proto/kvmem/v1/kvmem.proto, "Rules every client needs").

Every request here goes over a real port. What must hold whatever the caller sends:
- bytes that do not decode as the request message are INVALID_ARGUMENT, never INTERNAL or UNKNOWN;
- no request, however strange, gets INTERNAL or UNKNOWN, hangs, or hurts what is stored;
- a request that breaks a rule (ranges, ids, model spec) is INVALID_ARGUMENT and stores nothing;
- a save that is accepted restores bit-exactly (keys, values, positions, logical length);
- equal model specs are equal however their rope_json is spelled; a different spec is ModelMismatch.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import unicodedata

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmem.convert import spec_to_pb
from kvmem.v1 import kvmem_pb2 as pb
from kvmem.v1 import kvmem_pb2_grpc as pb_grpc
from kvstore import errors
from tests.conftest import TOY_SPEC, random_layers

H, D, L = TOY_SPEC.num_kv_heads, TOY_SPEC.head_dim, TOY_SPEC.num_layers
TIMEOUT = 10  # seconds, on every call
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MAX_TTL = 315_360_000
U64 = (1 << 64) - 1
REFUSED_ID_CHARS = ["\u0085", "\u009b", "\u200b", "\u2028", "\ufeff", "\x00", "\x7f"]

# name -> (shape, request class of the first message)
RPCS = {
    "SaveSession": ("stream_unary", pb.SaveSessionRequest),
    "AppendSession": ("stream_unary", pb.AppendSessionRequest),
    "RestoreSession": ("unary_stream", pb.RestoreSessionRequest),
    "ForkSession": ("unary_unary", pb.ForkSessionRequest),
    "Lookup": ("unary_unary", pb.LookupRequest),
    "GetSession": ("unary_unary", pb.GetSessionRequest),
    "ListSessions": ("unary_unary", pb.ListSessionsRequest),
    "DeleteSession": ("unary_unary", pb.DeleteSessionRequest),
    "GetStats": ("unary_unary", pb.GetStatsRequest),
    "Compact": ("unary_unary", pb.CompactRequest),
    "CompactStream": ("stream_unary", pb.CompactStreamRequest),
    "Retrieve": ("unary_stream", pb.RetrieveRequest),
    "SearchText": ("unary_unary", pb.SearchTextRequest),
    "Plan": ("unary_unary", pb.PlanRequest),
    "Answer": ("unary_unary", pb.PlanRequest),
}
# RPCs that may run a model (the hosted LM or the text embedder) when they reach a stored session
MODEL_RPCS = {"Compact", "CompactStream", "Retrieve", "SearchText", "Plan", "Answer"}


# ---------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def channel(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return pb_grpc.KVMemStub(channel)


@pytest.fixture
def kept(client):
    """A 40-token session saved before the hostile input; it must survive everything bit-exactly."""
    layers = random_layers(TOY_SPEC, 40, seed=99)
    client.save("kept", layers, list(range(40)))
    return layers


def call_raw(channel, name: str, payload) -> tuple[grpc.StatusCode, str, tuple]:
    """Send raw bytes (identity serializer): ``payload`` is bytes, or a list of messages (bytes)
    for the streaming-request RPCs. Returns (code, details, trailing metadata)."""
    shape, _ = RPCS[name]
    path = f"/kvmem.v1.KVMem/{name}"
    try:
        if shape == "stream_unary":
            channel.stream_unary(path, request_serializer=None, response_deserializer=None)(iter(list(payload)), timeout=TIMEOUT)
        elif shape == "unary_stream":
            for _ in channel.unary_stream(path, request_serializer=None, response_deserializer=None)(payload, timeout=TIMEOUT):
                pass
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(payload, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ())
    return OK, "", ()


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def toy_pb(**changes) -> pb.ModelSpec:
    message = spec_to_pb(TOY_SPEC)
    for key, value in changes.items():
        setattr(message, key, value)
    return message


def raw_kv(start: int, end: int, seed: int, heads: int = H) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (keys, values) raw float32 bit patterns uint32 [H, n, D]: every pattern, NaN payloads included."""
    rng = np.random.default_rng(seed)
    shape = (heads, end - start, D)
    return [(rng.integers(0, 1 << 32, size=shape, dtype=np.uint32), rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)) for _ in range(L)]


def kv_messages(start: int, layers, cls, chunk_tokens: int = 16) -> list:
    """Stream messages (of ``cls``) carrying ``layers`` (session tokens start..), one KVChunk per
    (layer, aligned chunk), plus the Commit."""
    messages, count = [], 0
    total = start + layers[0][0].shape[1]
    piece = start
    while piece < total:
        piece_end = min(total, (piece // chunk_tokens + 1) * chunk_tokens)
        entries = []
        for layer, (keys, values) in enumerate(layers):
            lo, hi = piece - start, piece_end - start
            entries.append(pb.KVChunk(layer=layer, token_start=piece, num_tokens=piece_end - piece, dtype=pb.DTYPE_FLOAT32,
                                      keys=np.ascontiguousarray(keys[:, lo:hi]).astype("<u4").tobytes(),
                                      values=np.ascontiguousarray(values[:, lo:hi]).astype("<u4").tobytes()))
        messages.append(cls(chunks=pb.KVChunks(chunks=entries)))
        count += len(entries)
        piece = piece_end
    messages.append(cls(commit=pb.Commit(num_chunks=count)))
    return messages


def save_header(session_id: str = "new", tokens: int = 8, **fields) -> pb.SaveHeader:
    fields.setdefault("model", toy_pb())
    return pb.SaveHeader(session_id=session_id, token_ids=fields.pop("token_ids", list(range(1000, 1000 + tokens))), **fields)


def send_save(stub, header: pb.SaveHeader, seed: int = 0):
    """Header + correct chunks for the header's tokens (from reuse_prefix_tokens, capped) + commit.
    Returns (code, details, layers sent)."""
    total = len(header.token_ids)
    start = min(header.reuse_prefix_tokens, total)
    layers = raw_kv(start, total, seed) if total > start else None
    messages = [pb.SaveSessionRequest(header=header)]
    messages += kv_messages(start, layers, pb.SaveSessionRequest) if layers else [pb.SaveSessionRequest(commit=pb.Commit())]
    code, details = code_of(lambda: stub.SaveSession(iter(messages), timeout=TIMEOUT))
    return code, details, layers


def send_append(stub, header: pb.AppendHeader, start: int, seed: int = 1):
    layers = raw_kv(start, start + len(header.token_ids), seed)
    messages = [pb.AppendSessionRequest(header=header)] + kv_messages(start, layers, pb.AppendSessionRequest)
    return code_of(lambda: stub.AppendSession(iter(messages), timeout=TIMEOUT))


def restore_raw(stub, session_id: str, tenant: str = "", model: pb.ModelSpec | None = None):
    """(RestoreHeader, per layer (keys, values) uint32 [H, T, D]) reassembled from the stream."""
    request = pb.RestoreSessionRequest(tenant=tenant, session_id=session_id)
    if model is not None:
        request.model.CopyFrom(model)
    stream = stub.RestoreSession(request, timeout=TIMEOUT)
    header = next(stream).header
    count = header.token_end - header.token_start
    heads, dim = header.session.model.num_kv_heads, header.session.model.head_dim
    layers = [(np.zeros((heads, count, dim), np.uint32), np.zeros((heads, count, dim), np.uint32)) for _ in range(header.session.model.num_layers)]
    received = 0
    for message in stream:
        assert message.WhichOneof("part") == "chunks"
        for c in message.chunks.chunks:
            lo = c.token_start - header.token_start
            shape = (heads, c.num_tokens, dim)
            layers[c.layer][0][:, lo:lo + c.num_tokens] = np.frombuffer(c.keys, "<u4").reshape(shape)
            layers[c.layer][1][:, lo:lo + c.num_tokens] = np.frombuffer(c.values, "<u4").reshape(shape)
            received += 1
    assert received == header.num_chunks
    return header, layers


def health_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kvmem.v1.KVMem"), timeout=TIMEOUT)
    return status.status == health_pb2.HealthCheckResponse.SERVING


def assert_kept_intact(client, kept_layers, port, version: int = 1, num_tokens: int = 40):
    info = client.get("kept")
    assert (info.num_tokens, info.version, info.logical_length) == (num_tokens, version, num_tokens)
    restored = client.restore("kept")
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(restored.layers, kept_layers))
    assert restored.token_ids.tolist() == list(range(40))
    assert health_serving(port)


def snapshot(stub) -> tuple:
    """What is stored, as seen from outside: total sessions, default tenant's sessions (id, T, version, expiry)."""
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=TIMEOUT)
    listed = stub.ListSessions(pb.ListSessionsRequest(page_size=1000), timeout=TIMEOUT)
    return stats.sessions, stats.chunks, [(s.session_id, s.num_tokens, s.version, s.expires_at_ms, s.logical_length) for s in listed.sessions]


# ---------------------------------------------------------------------------- 1. undecodable bytes
def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _ld(number: int, body: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(body)) + body


GENERIC_BAD = {
    "ff ff ff": b"\xff\xff\xff",
    "truncated tag": b"\x80",
    "truncated varint": b"\x08\x80",
    "overlong varint": b"\x08" + b"\xff" * 10 + b"\x01",
    "length past the end": b"\x0a\x10abc",
    "huge length": b"\x0a\xff\xff\xff\xff\x0f",
    "wire type 7": b"\x0f\x00",
    "wire type 6": b"\x0e\x00",
    "unterminated group": b"\x0b",
    "stray end group": b"\x0c",
    "truncated fixed64": b"\x09\x01\x02",
    "truncated fixed32": b"\x0d\x01",
    "field number 0": b"\x00\x01",
}
INVALID_UTF8 = {"c3 28": b"\xc3\x28", "surrogate ed a0 80": b"\xed\xa0\x80", "overlong c0 80": b"\xc0\x80", "lone ff": b"\xff"}


def _string_paths(descriptor, depth: int = 0) -> list[list]:
    """Paths (lists of field descriptors) to every string field, through message fields (and map entries)."""
    paths = []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            paths.append([field])
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 2:
            paths += [[field, *rest] for rest in _string_paths(field.message_type, depth + 1)]
    return paths


def _nest(path: list, leaf: bytes) -> bytes:
    data = leaf
    for field in reversed(path[:-1]):
        data = _ld(field.number, data)
    return data


def bad_payloads(name: str) -> dict[str, bytes]:
    """Undecodable encodings of RPC ``name``'s request: generic garbage, invalid UTF-8 in every
    string field (nested ones too), and nested lengths that run past their parent."""
    _, cls = RPCS[name]
    payloads = dict(GENERIC_BAD)
    for path in _string_paths(cls.DESCRIPTOR):
        where = ".".join(f.name for f in path)
        for label, raw in INVALID_UTF8.items():
            payloads[f"invalid UTF-8 ({label}) in {where}"] = _nest(path, _ld(path[-1].number, raw))
    for field in cls.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            payloads[f"{field.name}: nested length past its end"] = _ld(field.number, b"\x0a\x10abc")
            payloads[f"{field.name}: nested truncated varint"] = _ld(field.number, b"\x08\x80")
    if name == "GetSession":
        payloads["brief's example: field 2 c3 28"] = b"\x12\x02\xc3\x28"
    if cls in (pb.SaveSessionRequest, pb.AppendSessionRequest):  # the zero-copy chunk decoder's path (field 2)
        entry_past_end = _ld(1, b"\x0a\x10abc")
        payloads["chunks: entry runs past its end"] = _ld(2, entry_past_end)
        payloads["chunks: entry length past the message"] = _ld(2, b"\x0a\x10abc")
        payloads["chunks: KVChunk.keys with varint wire type"] = _ld(2, _ld(1, b"\x28\x01"))
        payloads["chunks: KVChunk.layer with length wire type"] = _ld(2, _ld(1, _ld(1, b"x")))
        payloads["chunks: KVChunk truncated varint"] = _ld(2, _ld(1, b"\x08\xff"))
        payloads["chunks: KVChunk overlong varint"] = _ld(2, _ld(1, b"\x08" + b"\xff" * 10 + b"\x01"))
        payloads["chunks then garbage"] = _ld(2, _ld(1, b"\x08\x01")) + b"\xff"
        payloads["commit: truncated"] = _ld(3, b"\x08\x80")
    return payloads


def valid_first_message(name: str) -> bytes:
    if name == "SaveSession":
        return pb.SaveSessionRequest(header=save_header("later")).SerializeToString()
    return pb.AppendSessionRequest(header=pb.AppendHeader(session_id="kept", model=toy_pb(), token_ids=[1, 2, 3, 4])).SerializeToString()


@pytest.mark.parametrize("name", sorted(RPCS))
def test_undecodable_bytes_are_invalid_argument_on_every_rpc(name, channel, stub, client, kept, service):
    before = snapshot(stub)
    wrong = {}
    for label, payload in bad_payloads(name).items():
        message = [payload] if RPCS[name][0] == "stream_unary" else payload
        code, details, _ = call_raw(channel, name, message)
        if code != INVALID:
            wrong[label] = f"{code.name}: {details[:160]}"
    assert not wrong, f"{name}: undecodable requests not answered INVALID_ARGUMENT: {wrong}"
    assert snapshot(stub) == before
    assert_kept_intact(client, kept, service.port)


@pytest.mark.parametrize("name", ["SaveSession", "AppendSession"])
@pytest.mark.parametrize("where", ["after the header", "after valid chunks"])
def test_undecodable_later_stream_message_is_invalid_argument(name, where, channel, stub, client, kept, service):
    before = snapshot(stub)
    start, cls = (0, pb.SaveSessionRequest) if name == "SaveSession" else (40, pb.AppendSessionRequest)
    body = [m.SerializeToString() for m in kv_messages(start, raw_kv(start, start + (8 if name == "SaveSession" else 4), 3), cls)]
    wrong = {}
    for label, payload in bad_payloads(name).items():
        if where == "after the header":
            messages = [valid_first_message(name), payload, *body]
        else:
            messages = [valid_first_message(name), *body[:-1], payload, body[-1]]
        code, details, _ = call_raw(channel, name, messages)
        if code != INVALID:
            wrong[label] = f"{code.name}: {details[:160]}"
    assert not wrong, f"{name}, bad message {where}: not INVALID_ARGUMENT: {wrong}"
    assert code_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id="later"), timeout=TIMEOUT))[0] == grpc.StatusCode.NOT_FOUND
    assert snapshot(stub) == before
    assert_kept_intact(client, kept, service.port)


# ---------------------------------------------------------------------------- 2. fuzz every RPC
WEIRD_TEXT = [
    "", "toy", "nope", "a" * 256, "a" * 257, "é" * 128, "é" * 129, "x/../../etc/passwd", "*", "%s%n", "ü🙂",
    "\x00", "a\x00b", "x\x85y", "\u009b[31m", "\u200b", "line\u2028sep", "\ufeffbom", "\x7f", "\t", " ", "\uffff", "\U0010ffff",
    "default", "{\"theta\":10000}", "not json", "[1,2",
]
U64_VALUES = [0, 1, 2, 4, 8, 16, 39, 40, 41, 4095, 4096, 4097, MAX_TTL, MAX_TTL + 1, 9223372036854776, (1 << 31),
              (1 << 32) - 1, 1 << 32, (1 << 62) - 1, 1 << 62, (1 << 63) - 1, 1 << 63, U64]
U32_VALUES = [0, 1, 2, 3, 4, 8, 16, 24, 256, 257, 1000, 1001, 4096, (1 << 31), (1 << 32) - 1]
FLOATS = [0.0, -0.0, -1.0, 1e-9, 0.5, 1.0, 1.5, 2.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324]
ID_FIELDS = {"session_id", "source_session_id", "target_session_id"}


def _text(rng: random.Random, field_name: str, model_rpc: bool) -> str:
    if field_name in ID_FIELDS:
        pool = [t for t in WEIRD_TEXT if not (model_rpc and t == "toy")]  # model RPCs only ever name absent sessions
        if rng.random() < 0.3:
            chars = (chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0, 0x10ffff)])) for _ in range(rng.randint(1, 12)))
            return "".join(ch for ch in chars if not 0xd800 <= ord(ch) < 0xe000) or "z"  # any code point but surrogates
        return rng.choice(pool)
    if field_name == "rope_json":
        return rng.choice(["", "{\"theta\":10000}", "{\"theta\": 10000.0}", "not json", "[1,2", "null", "{\"a\":NaN}", "[" * 2000, "{}"])
    if field_name == "weights_fingerprint":
        return rng.choice(["", "ab" * 16, "AB", "zz", "a" * 129, "0" * 128])
    if rng.random() < 0.3:
        return "".join(chr(rng.randint(1, 0xd7ff)) for _ in range(rng.randint(0, 30)))
    return rng.choice(WEIRD_TEXT)


def _scalar(rng: random.Random, field, model_rpc: bool):
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _text(rng, field.name, model_rpc)
    if kind == FieldDescriptor.TYPE_BYTES:
        size = rng.choice([0, 1, 3, 4, H * D * 4, 2 * H * D * 4, rng.randint(0, 300)])
        return rng.randbytes(size)
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([0, 1, 2, 3, 4, 99, -1])
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        value = rng.choice(FLOATS + [rng.uniform(-2, 2)])
        if kind == FieldDescriptor.TYPE_FLOAT and 3e38 < abs(value) < float("inf"):
            return 3e38  # float32 range
        return value
    if kind == FieldDescriptor.TYPE_UINT64:
        return rng.choice(U64_VALUES + [rng.getrandbits(64), rng.randint(0, 64)])
    if kind == FieldDescriptor.TYPE_UINT32:
        return rng.choice(U32_VALUES + [rng.getrandbits(32), rng.randint(0, 64)])
    if kind == FieldDescriptor.TYPE_INT64:
        return rng.choice([0, -1, 1, (1 << 63) - 1, -(1 << 63)])
    if kind == FieldDescriptor.TYPE_INT32:
        return rng.choice([0, -1, 1, (1 << 31) - 1, -(1 << 31)])
    raise AssertionError(f"no generator for field {field.full_name}")


def fill_random(rng: random.Random, message, model_rpc: bool, depth: int = 0):
    """Set a random subset of ``message``'s fields to hostile values (recursively)."""
    if message.DESCRIPTOR.full_name == "kvmem.v1.ModelSpec" and rng.random() < 0.6:
        message.CopyFrom(toy_pb())  # mostly the real spec (so requests get past the spec checks), sometimes mutated
        if rng.random() < 0.5:
            return message
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name):
            continue
        if rng.random() < 0.35:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                target = getattr(message, field.name)
                for _ in range(rng.randint(0, 3)):
                    target[_text(rng, "key", model_rpc)] = _text(rng, "value", model_rpc)
            elif field.is_repeated:
                if depth < 3:
                    for _ in range(rng.randint(0, 3)):
                        fill_random(rng, getattr(message, field.name).add(), model_rpc, depth + 1)
            elif depth < 3:
                fill_random(rng, getattr(message, field.name), model_rpc, depth + 1)
        elif field.is_repeated:
            target = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_UINT32 and rng.random() < 0.5:
                start = rng.choice([0, 1000, 2 ** 31])
                target.extend(range(start, start + rng.randint(0, 48)))  # token runs that may match stored prefixes
            else:
                target.extend(_scalar(rng, field, model_rpc) for _ in range(rng.randint(0, 6)))
        else:
            setattr(message, field.name, _scalar(rng, field, model_rpc))
    return message


def _random_chunk(rng: random.Random) -> pb.KVChunk:
    n = rng.choice([0, 1, 4, 8, 16, rng.randint(0, 40), (1 << 32) - 1])
    size = H * min(n, 40) * D * 4 if rng.random() < 0.6 else rng.randint(0, 200)
    chunk = pb.KVChunk(layer=rng.choice([0, 1, 3, 4, (1 << 32) - 1]), token_start=rng.choice([0, 8, 16, 40, 1 << 62, 1 << 63, U64]),
                       num_tokens=n, dtype=rng.choice([0, 1, 2, 3, 99]), keys=rng.randbytes(size), values=rng.randbytes(size))
    if rng.random() < 0.2:
        chunk.bias = rng.randbytes(rng.choice([0, 4, H * max(n, 1) * 4 if n < 100 else 8]))
    return chunk


def random_request(rng: random.Random, name: str):
    """A hostile request built with the generated classes: a message, or a list of messages for streams."""
    shape, cls = RPCS[name]
    model_rpc = name in MODEL_RPCS
    if shape != "stream_unary":
        return fill_random(rng, cls(), model_rpc)
    if cls is pb.CompactStreamRequest:
        messages = [cls(request=fill_random(rng, pb.CompactRequest(), model_rpc))] if rng.random() < 0.9 else []
        for _ in range(rng.randint(0, 4)):
            messages.append(cls(references=fill_random(rng, pb.ReferencePart(), model_rpc)))
        if rng.random() < 0.2:
            messages.append(cls(request=fill_random(rng, pb.CompactRequest(), model_rpc)))  # a second request
        return messages
    header_cls = pb.SaveHeader if cls is pb.SaveSessionRequest else pb.AppendHeader
    header = fill_random(rng, header_cls(), model_rpc)
    messages = [cls(header=header)] if rng.random() < 0.9 else []
    chunks = [_random_chunk(rng) for _ in range(rng.randint(0, 5))]
    for chunk in chunks:
        messages.append(cls(chunks=pb.KVChunks(chunks=[chunk])))
    if rng.random() < 0.3:
        messages.append(cls(header=header))  # a second header
    if rng.random() < 0.8:
        messages.append(cls(commit=pb.Commit(num_chunks=rng.choice([len(chunks), 0, U64]))))
    return messages


def mutate(rng: random.Random, message, model_rpc: bool, depth: int = 0) -> None:
    """Change one field of ``message`` (or of a message inside it) to a hostile value."""
    field = rng.choice(message.DESCRIPTOR.fields)
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        getattr(message, field.name)[_text(rng, "key", model_rpc)] = _text(rng, "value", model_rpc)
    elif field.type == FieldDescriptor.TYPE_MESSAGE and field.is_repeated:
        items = getattr(message, field.name)
        choice = rng.random()
        if len(items) and choice < 0.6 and depth < 4:
            mutate(rng, items[rng.randrange(len(items))], model_rpc, depth + 1)
        elif len(items) and choice < 0.8:
            items.add().CopyFrom(items[rng.randrange(len(items))])  # a duplicate entry
        elif len(items):
            del items[rng.randrange(len(items))]  # a missing entry
        else:
            fill_random(rng, items.add(), model_rpc, depth + 1)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        if message.HasField(field.name) and rng.random() < 0.7 and depth < 4:
            mutate(rng, getattr(message, field.name), model_rpc, depth + 1)
        elif message.HasField(field.name) and rng.random() < 0.5:
            message.ClearField(field.name)
        else:
            fill_random(rng, getattr(message, field.name), model_rpc, depth + 1)
    elif field.is_repeated:
        items = getattr(message, field.name)
        choice = rng.random()
        if choice < 0.2:
            del items[:]
        elif len(items) and choice < 0.6:
            items[rng.randrange(len(items))] = _scalar(rng, field, model_rpc)
        elif len(items) and choice < 0.8:
            del items[rng.randrange(len(items)):]  # truncated
        else:
            items.append(_scalar(rng, field, model_rpc))
    elif field.type == FieldDescriptor.TYPE_BYTES and rng.random() < 0.5:
        data = getattr(message, field.name)
        setattr(message, field.name, data[: rng.randrange(len(data) + 1)] if data and rng.random() < 0.5 else data + rng.randbytes(rng.choice([1, 4, 32])))
    else:
        setattr(message, field.name, _scalar(rng, field, model_rpc))


def valid_request(rng: random.Random, name: str, stub, counter: int):
    """A request that would succeed (or be NOT_FOUND, for the model RPCs), to mutate from."""
    if name == "SaveSession":
        total = rng.randint(1, 40)
        header = save_header(f"fz-{counter}", tokens=total, token_ids=[rng.getrandbits(32) for _ in range(total)],
                             ttl_seconds=rng.choice([0, 3600]), positions=[5 + 2 * i for i in range(total)] if rng.random() < 0.3 else [])
        return [pb.SaveSessionRequest(header=header), *kv_messages(0, raw_kv(0, total, counter), pb.SaveSessionRequest)]
    if name == "AppendSession":
        current = stub.GetSession(pb.GetSessionRequest(session_id="toy"), timeout=TIMEOUT).num_tokens
        added = rng.randint(1, 20)
        header = pb.AppendHeader(session_id="toy", model=toy_pb(), token_ids=[rng.getrandbits(32) for _ in range(added)], expected_num_tokens=current)
        return [pb.AppendSessionRequest(header=header), *kv_messages(current, raw_kv(current, current + added, counter), pb.AppendSessionRequest)]
    absent = f"absent-{counter}"
    if name == "CompactStream":
        queries = torch.randn(2 * H, 4, D).numpy().tobytes()
        return [pb.CompactStreamRequest(request=pb.CompactRequest(session_id=absent, method=rng.choice(["knorm", "attention_matching"]), ratio=0.5)),
                *(pb.CompactStreamRequest(references=pb.ReferencePart(layer=layer, num_query_heads=2 * H, num_queries=4, data=queries)) for layer in range(L))]
    return {
        "RestoreSession": lambda: pb.RestoreSessionRequest(session_id="toy", model=toy_pb(), token_start=2, token_end=20),
        "ForkSession": lambda: pb.ForkSessionRequest(source_session_id="toy", target_session_id=f"fork-{counter}", at_token=10, ttl_seconds=3600),
        "Lookup": lambda: pb.LookupRequest(model=toy_pb(), token_ids=list(range(1000, 1030))),
        "GetSession": lambda: pb.GetSessionRequest(session_id="toy"),
        "ListSessions": lambda: pb.ListSessionsRequest(page_size=1, page_token=stub.ListSessions(pb.ListSessionsRequest(page_size=1), timeout=TIMEOUT).next_page_token),
        "DeleteSession": lambda: pb.DeleteSessionRequest(session_id=rng.choice(["toy", absent])),
        "GetStats": lambda: pb.GetStatsRequest(tenant=rng.choice(["", "default"])),
        "Compact": lambda: pb.CompactRequest(session_id=absent, method=rng.choice(["knorm", "attention_matching", "h2o"]), ratio=0.5),
        "Retrieve": lambda: pb.RetrieveRequest(session_id=absent, query_token_ids=[1, 2, 3], budget_tokens=8),
        "SearchText": lambda: pb.SearchTextRequest(session_id=absent, query="what is it", k=3),
        "Plan": lambda: pb.PlanRequest(session_id=absent, query="what is it?", max_new_tokens=8),
        "Answer": lambda: pb.PlanRequest(session_id=absent, query="what is it?", max_new_tokens=8),
    }[name]()


def mutated_request(rng: random.Random, name: str, stub, counter: int):
    request = valid_request(rng, name, stub, counter)
    model_rpc = name in MODEL_RPCS
    for _ in range(rng.choice([1, 1, 2, 3])):
        if isinstance(request, list):
            choice = rng.random()
            if choice < 0.1 and len(request) > 2:
                del request[rng.randrange(1, len(request) - 1)]  # a chunk message goes missing
            elif choice < 0.15 and name != "CompactStream":
                request.insert(rng.randrange(1, len(request) + 1), type(request[0])(commit=pb.Commit(num_chunks=rng.choice([0, 1, U64]))))
            else:
                mutate(rng, request[rng.randrange(len(request))], model_rpc)
        else:
            mutate(rng, request, model_rpc)
    if not isinstance(request, list) and model_rpc and request.session_id in ("toy", "ref"):
        request.session_id = f"absent-{counter}"  # model RPCs never reach a stored session (no model loads)
    if name == "CompactStream":
        for message in request:
            if message.WhichOneof("part") == "request" and message.request.session_id in ("toy", "ref"):
                message.request.session_id = f"absent-{counter}"
    return request


@pytest.mark.parametrize("name", sorted(RPCS))
def test_fuzz_never_internal_and_store_survives(name, channel, stub, client, service):
    rng = random.Random(f"kvmem-contract-{name}")
    reference = random_layers(TOY_SPEC, 40, seed=7)
    client.save("ref", reference, list(range(40)))  # never named by a fuzzed request
    bad: list[str] = []

    def send(payload, what):
        if isinstance(payload, list):
            payload = [m if isinstance(m, bytes) else m.SerializeToString() for m in payload]
        elif not isinstance(payload, bytes):
            payload = payload.SerializeToString()
        code, details, _ = call_raw(channel, name, payload)
        if code in NEVER or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            bad.append(f"{what}: {code.name}: {details[:200]}")

    for round_ in range(30):
        if code_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id="toy"), timeout=TIMEOUT))[0] != OK:
            client.save("toy", random_layers(TOY_SPEC, 24, seed=round_), list(range(1000, 1024)), overwrite=True)  # the fuzzer's to change
        data = rng.randbytes(rng.choice([0, 1, 2, 3, 5, 8, 16, 64, rng.randint(0, 200)]))
        if RPCS[name][0] == "stream_unary":
            first = valid_request(rng, name, stub, round_)[0]
            send([data] if rng.random() < 0.5 else [first, data], f"random bytes #{round_} {data!r:.120}")
        else:
            send(data, f"random bytes #{round_} {data!r:.120}")
        request = random_request(rng, name)
        send(request, f"random message #{round_} {request!s:.300}")
        request = mutated_request(rng, name, stub, round_)
        send(request, f"mutated message #{round_} {request!s:.300}")
    assert not bad, f"{name}: {len(bad)} fuzzed requests got INTERNAL/UNKNOWN or hung:\n" + "\n".join(bad[:10])
    assert health_serving(service.port)
    restored = client.restore("ref")
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(restored.layers, reference))
    assert client.get("ref").version == 1
    for info in stub.ListSessions(pb.ListSessionsRequest(page_size=1000), timeout=TIMEOUT).sessions:  # whatever got stored reads back
        header, _ = restore_raw(stub, info.session_id)
        assert header.token_end - header.token_start == info.num_tokens
    assert service.host is None or service.host._loaded is None, "a fuzzed request made the server load its hosted model"


# ---------------------------------------------------------------------------- 3. overflows store nothing
E257 = "é" * 128 + "x"  # 257 bytes of UTF-8 in 129 characters
SAVE_OVERFLOWS: dict[str, dict] = {
    "ttl 9223372036854776": dict(ttl_seconds=9223372036854776),
    "ttl 2^64-1": dict(ttl_seconds=U64),
    "ttl 315360001": dict(ttl_seconds=MAX_TTL + 1),
    "positions >= 2^63": dict(positions=[(1 << 63) + i for i in range(8)]),
    "positions 2^64-8..2^64-1": dict(positions=[U64 - 7 + i for i in range(8)]),
    "positions = 2^62": dict(positions=[(1 << 62) + i for i in range(8)]),
    "last position = 2^62": dict(positions=[0, 1, 2, 3, 4, 5, 6, 1 << 62]),
    "last position = 2^62-1 (logical length 2^62)": dict(positions=[(1 << 62) - 8 + i for i in range(8)]),
    "more positions than tokens": dict(positions=list(range(9))),
    "fewer positions than tokens": dict(positions=list(range(7))),
    "logical_length 2^64-1": dict(logical_length=U64),
    "logical_length 2^63": dict(logical_length=1 << 63),
    "logical_length 2^62": dict(logical_length=1 << 62),
    "logical_length < T": dict(logical_length=5),
    "logical_length < last position + 1": dict(positions=[10 + i for i in range(8)], logical_length=12),
    "logical_length = last position": dict(positions=[10 + i for i in range(8)], logical_length=17),
    "max_position 0": dict(model=toy_pb(max_position=0)),
    "max_position 2^62+1": dict(model=toy_pb(max_position=(1 << 62) + 1)),
    "max_position 2^64-1": dict(model=toy_pb(max_position=U64)),
    "rope_json not json": dict(model=toy_pb(rope_json="not json")),
    "rope_json [1,2": dict(model=toy_pb(rope_json="[1,2")),
    "dtype unspecified": dict(model=toy_pb(dtype=pb.DTYPE_UNSPECIFIED)),
    "dtype 99": dict(model=toy_pb(dtype=99)),
    "num_layers 0": dict(model=toy_pb(num_layers=0)),
    "reuse_prefix_tokens > T": dict(reuse_prefix_tokens=9),
    "reuse_prefix_tokens 2^64-1": dict(reuse_prefix_tokens=U64),
    "session id 257 bytes (ascii)": dict(session_id="x" * 257),
    "session id 257 bytes (129 chars)": dict(session_id=E257),
    "tenant 257 bytes (ascii)": dict(tenant="t" * 257),
    "tenant 257 bytes (129 chars)": dict(tenant=E257),
    **{f"session id with U+{ord(ch):04X}": dict(session_id=f"a{ch}b") for ch in REFUSED_ID_CHARS},
    **{f"tenant with U+{ord(ch):04X}": dict(tenant=f"t{ch}") for ch in REFUSED_ID_CHARS},
    **{f"session id only U+{ord(ch):04X}": dict(session_id=ch) for ch in REFUSED_ID_CHARS},
}


def _refused_and_nothing_stored(stub, code, details, before, session_id, tenant=""):
    assert code == INVALID, f"{code.name}: {details}"
    lookup, lookup_details = code_of(lambda: stub.GetSession(pb.GetSessionRequest(tenant=tenant, session_id=session_id), timeout=TIMEOUT))
    assert lookup in (grpc.StatusCode.NOT_FOUND, INVALID), f"GetSession after a refused save: {lookup.name} {lookup_details}"
    assert snapshot(stub) == before  # total sessions (every tenant), chunks, and the default tenant's listing


@pytest.mark.parametrize("case", sorted(SAVE_OVERFLOWS))
def test_save_overflow_is_invalid_argument_and_stores_nothing(case, stub, client, kept, service):
    fields = dict(SAVE_OVERFLOWS[case])
    session_id = fields.pop("session_id", "new")
    before = snapshot(stub)
    header = save_header(session_id, **fields)
    code, details, _ = send_save(stub, header)
    _refused_and_nothing_stored(stub, code, details, before, session_id, header.tenant)
    if session_id == "new" and not header.tenant:  # a well-formed id: the lookup itself must say NOT_FOUND
        assert code_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id="new"), timeout=TIMEOUT))[0] == grpc.StatusCode.NOT_FOUND
    assert_kept_intact(client, kept, service.port)


@pytest.mark.parametrize("case", ["ttl 2^64-1", "positions >= 2^63", "positions = 2^62", "logical_length 2^64-1",
                                  "logical_length < T", "max_position 0", "rope_json not json", "reuse_prefix_tokens > T", "tenant with U+0085"])
def test_refused_overwrite_keeps_the_existing_session(case, stub, client, kept, service):
    """overwrite=true on a stored session with a header that breaks a rule: refused, and the old session stays."""
    fields = dict(SAVE_OVERFLOWS[case])
    if "positions" in fields:
        fields["positions"] = [fields["positions"][0] + i for i in range(40)]  # one per token: only the range is wrong
    before = snapshot(stub)
    header = save_header("kept", overwrite=True, token_ids=list(range(40)), **fields)
    code, details, _ = send_save(stub, header)
    assert code == INVALID, f"{code.name}: {details}"
    assert snapshot(stub) == before
    assert_kept_intact(client, kept, service.port)


@pytest.mark.parametrize("fields", [
    dict(ttl_seconds=MAX_TTL), dict(positions=[4088 + i for i in range(8)]), dict(logical_length=8),
    dict(positions=[10 + i for i in range(8)], logical_length=18), dict(positions=[10 + i for i in range(8)], logical_length=4096),
    # positions may pass max_position (stored for retrieval and compaction); only 2^62 bounds them
    dict(positions=[4096 + i for i in range(8)]), dict(model=toy_pb(max_position=4)), dict(logical_length=5000),
    dict(positions=[(1 << 62) - 9 + i for i in range(8)]), dict(positions=[10 + i for i in range(8)], logical_length=(1 << 62) - 1),
    dict(session_id="x" * 256), dict(session_id="é" * 128), dict(tenant="t" * 256), dict(session_id="ü🙂\uffff"),
], ids=["ttl 315360000", "last position max_position-1", "logical_length T", "logical_length last+1", "logical_length max_position",
        "positions past max_position", "tokens past max_position", "logical_length past max_position",
        "last position 2^62-2", "logical_length 2^62-1",
        "id 256 bytes", "id 256 bytes (128 chars)", "tenant 256 bytes", "id non-ascii"])
def test_limits_themselves_are_accepted_and_round_trip(fields, stub, client, kept, service):
    fields = dict(fields)
    session_id = fields.pop("session_id", "edge")
    before = snapshot(stub)
    header = save_header(session_id, **fields)
    code, details, layers = send_save(stub, header, seed=5)
    assert code == OK, details
    restored, got = restore_raw(stub, session_id, tenant=header.tenant)
    assert list(restored.token_ids) == list(header.token_ids)
    assert list(restored.positions) == (list(header.positions) or list(range(8)))
    expected_logical = header.logical_length or (max(header.positions) + 1 if header.positions else 8)
    assert restored.session.logical_length == expected_logical
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, layers))
    if header.ttl_seconds:
        assert restored.session.expires_at_ms - restored.session.updated_at_ms == MAX_TTL * 1000
    assert snapshot(stub)[0] == before[0] + 1


APPEND_OVERFLOWS = {
    "ttl 9223372036854776": dict(ttl_seconds=9223372036854776),
    "ttl 2^64-1": dict(ttl_seconds=U64),
    "ttl 315360001": dict(ttl_seconds=MAX_TTL + 1),
    "model max_position 0": dict(model=toy_pb(max_position=0)),
    "model rope_json not json": dict(model=toy_pb(rope_json="not json")),
    "tenant with U+2028": dict(tenant="t\u2028"),
}


@pytest.mark.parametrize("case", sorted(APPEND_OVERFLOWS))
def test_append_overflow_is_invalid_argument_and_leaves_the_session_unchanged(case, stub, client, kept, service):
    fields = dict(APPEND_OVERFLOWS[case])
    fields.setdefault("model", toy_pb())
    fields.setdefault("token_ids", [1, 2, 3, 4])
    before = snapshot(stub)
    info_before = stub.GetSession(pb.GetSessionRequest(session_id="kept"), timeout=TIMEOUT)
    code, details = send_append(stub, pb.AppendHeader(session_id="kept", **fields), start=40)
    assert code == INVALID, f"{code.name}: {details}"
    info = stub.GetSession(pb.GetSessionRequest(session_id="kept"), timeout=TIMEOUT)
    assert info == info_before
    assert snapshot(stub) == before
    assert_kept_intact(client, kept, service.port)


def test_append_ttl_limit_is_accepted(stub, client, kept, service):
    code, details = send_append(stub, pb.AppendHeader(session_id="kept", model=toy_pb(), token_ids=[1, 2, 3, 4], ttl_seconds=MAX_TTL), start=40)
    assert code == OK, details
    info = stub.GetSession(pb.GetSessionRequest(session_id="kept"), timeout=TIMEOUT)
    assert (info.num_tokens, info.version) == (44, 2) and info.expires_at_ms - info.updated_at_ms == MAX_TTL * 1000


def test_append_past_max_position_is_accepted(stub, client, kept, service):
    """Positions may pass max_position (the rules say so): an append beyond the window is stored."""
    added = TOY_SPEC.max_position - 40 + 8
    code, details = send_append(stub, pb.AppendHeader(session_id="kept", model=toy_pb(), token_ids=list(range(added))), start=40)
    assert code == OK, details
    restored, _ = restore_raw(stub, "kept")
    assert restored.session.num_tokens == restored.session.logical_length == 40 + added and list(restored.positions)[-1] == 40 + added - 1


@pytest.mark.parametrize("request_fields", [
    dict(ttl_seconds=9223372036854776), dict(ttl_seconds=U64), dict(ttl_seconds=MAX_TTL + 1),
    dict(at_token=U64), dict(at_token=1 << 63), dict(at_token=41), dict(target_session_id="f\u200bk"), dict(target_session_id="x" * 257),
], ids=["ttl 9223372036854776", "ttl 2^64-1", "ttl 315360001", "at_token 2^64-1", "at_token 2^63", "at_token T+1", "target U+200B", "target 257 bytes"])
def test_fork_overflow_is_invalid_argument_and_stores_nothing(request_fields, stub, client, kept, service):
    fields = dict(request_fields)
    target = fields.pop("target_session_id", "fk")
    before = snapshot(stub)
    code, details = code_of(lambda: stub.ForkSession(pb.ForkSessionRequest(source_session_id="kept", target_session_id=target, **fields), timeout=TIMEOUT))
    _refused_and_nothing_stored(stub, code, details, before, target)
    assert_kept_intact(client, kept, service.port)


@pytest.mark.parametrize("request_fields", [
    dict(token_start=U64), dict(token_end=U64), dict(token_start=1 << 63, token_end=(1 << 63) + 1), dict(token_start=30, token_end=20),
    dict(model=toy_pb(max_position=0)), dict(model=toy_pb(rope_json="[1,2")), dict(tenant="t\x00"),
], ids=["start 2^64-1", "end 2^64-1", "start 2^63", "start > end", "max_position 0", "rope_json [1,2", "tenant NUL"])
def test_restore_out_of_range_is_invalid_argument(request_fields, stub, client, kept, service):
    def run():
        list(stub.RestoreSession(pb.RestoreSessionRequest(session_id="kept", **request_fields), timeout=TIMEOUT))

    code, details = code_of(run)
    assert code == INVALID, f"{code.name}: {details}"
    assert_kept_intact(client, kept, service.port)


def test_append_past_logical_length_2_62_is_refused(stub):
    """logical_length stays below 2^62: an append that would reach it is refused and changes nothing."""
    near = (1 << 62) - 2
    assert send_save(stub, save_header("high", positions=[near - 8 + i for i in range(8)], logical_length=near))[0] == OK
    info = stub.GetSession(pb.GetSessionRequest(session_id="high"), timeout=TIMEOUT)
    code, details = send_append(stub, pb.AppendHeader(session_id="high", model=toy_pb(), token_ids=[1, 2]), start=8)
    assert code == INVALID, f"{code.name}: {details}"
    assert stub.GetSession(pb.GetSessionRequest(session_id="high"), timeout=TIMEOUT) == info
    code, details = send_append(stub, pb.AppendHeader(session_id="high", model=toy_pb(), token_ids=[1]), start=8)
    assert code == OK, details
    restored, _ = restore_raw(stub, "high")
    assert restored.session.logical_length == (1 << 62) - 1 and list(restored.positions)[-1] == near


# ---------------------------------------------------------------------------- positions and logical length through append and fork
@pytest.mark.parametrize("explicit", [False, True], ids=["positions empty", "positions 0..T-1 given"])
def test_append_continues_at_logical_length(explicit, stub):
    """SessionInfo.logical_length: "new tokens continue at this position". A save of 8 tokens at
    0..7 with logical_length 100, then an append of 4: their positions are 100..103."""
    header = save_header("gap", logical_length=100, positions=list(range(8)) if explicit else [])
    assert send_save(stub, header)[0] == OK
    code, details = send_append(stub, pb.AppendHeader(session_id="gap", model=toy_pb(), token_ids=[1, 2, 3, 4]), start=8)
    assert code == OK, details
    restored, _ = restore_raw(stub, "gap")
    assert restored.session.logical_length == 104
    assert list(restored.positions) == list(range(8)) + [100, 101, 102, 103]


def test_append_to_a_session_with_positions_continues_at_logical_length(stub):
    assert send_save(stub, save_header("pos", positions=[10 + i for i in range(8)], logical_length=30))[0] == OK
    assert send_append(stub, pb.AppendHeader(session_id="pos", model=toy_pb(), token_ids=[1, 2]), start=8)[0] == OK
    restored, _ = restore_raw(stub, "pos")
    assert restored.session.logical_length == 32 and list(restored.positions) == [10 + i for i in range(8)] + [30, 31]


def test_kv_appended_after_a_logical_gap_is_not_served_to_a_plain_session(stub):
    """Tokens appended at positions 100..103 have other KV than the same tokens at 8..11: a plain
    session of those tokens must get back its own KV, not the gapped session's."""
    assert send_save(stub, save_header("gap", logical_length=100), seed=1)[0] == OK  # tokens 1000..1007 at 0..7
    assert send_append(stub, pb.AppendHeader(session_id="gap", model=toy_pb(), token_ids=[1, 2, 3, 4]), start=8, seed=2)[0] == OK
    tokens = list(range(1000, 1008)) + [1, 2, 3, 4]
    code, details, sent = send_save(stub, save_header("plain", token_ids=tokens), seed=3)
    assert code == OK, details
    _, got = restore_raw(stub, "plain")
    assert all(np.array_equal(got[layer][0][:, 8:], sent[layer][0][:, 8:]) for layer in range(L)), \
        "the plain session restored the KV that another session appended at positions 100..103"


@pytest.mark.parametrize("positions", [[], [10 + i for i in range(8)]], ids=["positions empty", "positions given"])
def test_fork_of_a_whole_session_keeps_positions_and_logical_length(positions, stub):
    assert send_save(stub, save_header("src", positions=positions, logical_length=100))[0] == OK
    stub.ForkSession(pb.ForkSessionRequest(source_session_id="src", target_session_id="copy"), timeout=TIMEOUT)
    source, source_kv = restore_raw(stub, "src")
    copy, copy_kv = restore_raw(stub, "copy")
    assert copy.session.logical_length == source.session.logical_length == 100
    assert list(copy.positions) == list(source.positions)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(copy_kv, source_kv))


def test_stale_append_is_aborted_not_invalid(stub, client, kept, service):
    """expected_num_tokens: "refused with ABORTED unless the session currently holds exactly this
    many tokens". A writer that still thinks the session holds 40 tokens (and sends the KV of
    tokens 40..43) after another writer took it to 44 must get ABORTED (restore and retry), not
    INVALID_ARGUMENT (its request is well-formed)."""
    assert send_append(stub, pb.AppendHeader(session_id="kept", model=toy_pb(), token_ids=[7] * 4, expected_num_tokens=40), start=40)[0] == OK
    info = stub.GetSession(pb.GetSessionRequest(session_id="kept"), timeout=TIMEOUT)
    code, details = send_append(stub, pb.AppendHeader(session_id="kept", model=toy_pb(), token_ids=[8] * 4, expected_num_tokens=40), start=40)
    assert code == grpc.StatusCode.ABORTED, f"{code.name}: {details}"
    assert stub.GetSession(pb.GetSessionRequest(session_id="kept"), timeout=TIMEOUT) == info


def test_racing_writers_one_wins_and_nothing_tears(stub, client, kept, service):
    """Appends that all expect 40 tokens: exactly one lands, the rest are ABORTED. Saves of one new
    id without overwrite: exactly one lands, the rest ALREADY_EXISTS. Restores racing a delete read
    the whole session or NOT_FOUND, never a torn one."""
    from concurrent.futures import ThreadPoolExecutor

    layers = random_layers(TOY_SPEC, 40, seed=99)
    for round_ in range(8):
        session_id = "kept" if round_ == 0 else f"kept{round_}"
        if round_:
            client.save(session_id, layers, list(range(40)))

        def append(i):
            header = pb.AppendHeader(session_id=session_id, model=toy_pb(), token_ids=[i, i, i, i], expected_num_tokens=40)
            return send_append(stub, header, start=40, seed=i)

        with ThreadPoolExecutor(8) as pool:
            appended = list(pool.map(append, range(8)))
        codes = [code for code, _ in appended]
        assert codes.count(OK) == 1 and set(codes) == {OK, grpc.StatusCode.ABORTED}, [f"{c.name}: {d}" for c, d in appended if c != OK]
        info = stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT)
        assert (info.num_tokens, info.version) == (44, 2)
        winner = codes.index(OK)
        restored, got = restore_raw(stub, session_id)
        assert list(restored.token_ids)[40:] == [winner] * 4
        assert all(np.array_equal(got[layer][0][:, 40:], raw_kv(40, 44, winner)[layer][0]) for layer in range(L))

    def save(i):
        return send_save(stub, save_header("race"), seed=i)[0]

    with ThreadPoolExecutor(8) as pool:
        saved = list(pool.map(save, range(8)))
    assert saved.count(OK) == 1 and set(saved) == {OK, grpc.StatusCode.ALREADY_EXISTS}, saved

    def restore_or_missing(_):
        try:
            header, layers = restore_raw(stub, "race")
            return header.session.num_tokens == 8 and layers[0][0].shape[1] == 8
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND

    with ThreadPoolExecutor(8) as pool:
        reads = [pool.submit(restore_or_missing, i) for i in range(16)]
        deleted = pool.submit(lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id="race"), timeout=TIMEOUT))
        assert all(r.result() for r in reads)
        deleted.result()
    assert code_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id="race"), timeout=TIMEOUT))[0] == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------- 4. canonical rope_json
ROPE_SPELLINGS = [
    ('{"theta":10000}', '{"theta": 10000.0}'),
    ('{"theta": 10000.0}', '{"theta":10000}'),
    ('{"theta":1e4}', '{"theta":10000}'),
    ('{"b":1,"a":{"y":2.0,"x":[1.0,2]}}', '{ "a" : { "x" : [1, 2.0], "y" : 2 }, "b" : 1.0 }'),
]


@pytest.mark.parametrize("saved, asked", ROPE_SPELLINGS)
def test_rope_json_spellings_are_one_model(saved, asked, stub):
    code, details, layers = send_save(stub, save_header("rope", tokens=40, model=toy_pb(rope_json=saved)), seed=11)
    assert code == OK, details
    header, got = restore_raw(stub, "rope", model=toy_pb(rope_json=asked))  # a ModelMismatch would raise here
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, layers))
    assert header.session.model.rope_json == stub.GetSession(pb.GetSessionRequest(session_id="rope"), timeout=TIMEOUT).model.rope_json
    stored = header.session.model.rope_json
    assert stored.replace(" ", "") == stored and ".0" not in stored, f"stored rope_json not canonical: {stored!r}"
    tokens = list(range(1000, 1040))
    matched = stub.Lookup(pb.LookupRequest(model=toy_pb(rope_json=asked), token_ids=tokens + [7]), timeout=TIMEOUT).matched_tokens
    assert matched == 40
    # a save with the other spelling shares the stored prefix instead of writing it again
    response = stub.SaveSession(iter([pb.SaveSessionRequest(header=save_header("rope2", tokens=40, model=toy_pb(rope_json=asked), reuse_prefix_tokens=32)),
                                      *kv_messages(32, raw_kv(32, 40, 12), pb.SaveSessionRequest)]), timeout=TIMEOUT)
    assert response.deduplicated_tokens >= 32
    assert stub.Lookup(pb.LookupRequest(model=toy_pb(rope_json='{"theta":20000}'), token_ids=tokens), timeout=TIMEOUT).matched_tokens == 0


# ---------------------------------------------------------------------------- 5. error classes reach the client
@pytest.mark.parametrize("change", [dict(weights_fingerprint="ab" * 16), dict(num_layers=L + 1), dict(rope_json='{"theta":10000}'), dict(max_position=8192)],
                         ids=["weights_fingerprint", "num_layers", "rope_json", "max_position"])
def test_spec_mismatch_is_model_mismatch_with_metadata(change, stub, client, kept, service):
    other = dataclasses.replace(TOY_SPEC, **change)
    with pytest.raises(errors.ModelMismatch) as info:
        client.restore("kept", spec=other)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert next(iter(change)) in str(info.value)

    with pytest.raises(grpc.RpcError) as raw:
        list(stub.RestoreSession(pb.RestoreSessionRequest(session_id="kept", model=spec_to_pb(other)), timeout=TIMEOUT))
    assert raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("kvmem-error", "ModelMismatch") in tuple(raw.value.trailing_metadata() or ())

    if other.num_layers == L:  # same layout: an append with the other spec is refused the same way
        with pytest.raises(errors.ModelMismatch):
            client.append("kept", [(torch.cat([k, k[:, :2]], 1), torch.cat([v, v[:, :2]], 1)) for k, v in kept], [5, 6], spec=other)
    assert client.lookup(list(range(40)), spec=other) == 0
    assert_kept_intact(client, kept, service.port)


def test_plain_failed_precondition_stays_failed_precondition(stub, client, kept, service):
    compacted = client.compact("kept", "knorm", ratio=0.5).session.session_id  # knorm needs no model
    with pytest.raises(errors.FailedPrecondition) as info:
        client.compact(compacted, "knorm", ratio=0.5)
    assert type(info.value) is errors.FailedPrecondition and info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as raw:
        stub.Compact(pb.CompactRequest(session_id=compacted, method="knorm", ratio=0.5), timeout=TIMEOUT)
    assert raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("kvmem-error", "FailedPrecondition") in tuple(raw.value.trailing_metadata() or ())
    assert_kept_intact(client, kept, service.port)


# ---------------------------------------------------------------------------- 6. property: accepted = restorable, refused = nothing stored
def _id_ok(value: str) -> bool:
    encoded = value.encode("utf-8")
    return 1 <= len(encoded) <= 256 and not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value)


def contract_accepts(header: pb.SaveHeader) -> bool:
    """The contract's verdict on a save of this header (with correct chunks) into an empty store."""
    total, positions = len(header.token_ids), list(header.positions)
    if not (_id_ok(header.session_id) and (header.tenant == "" or _id_ok(header.tenant))):
        return False
    if header.ttl_seconds > MAX_TTL:
        return False
    if positions and (len(positions) != total or max(positions) >= 1 << 62):  # max_position is no bound
        return False
    last = max(positions) if positions else total - 1
    if header.logical_length and (header.logical_length < total or header.logical_length <= last):
        return False
    return (header.logical_length or last + 1) < 1 << 62


POSITION_STARTS = [0, 1, 100, 4000, 4050, 4096, 1 << 62, (1 << 62) - 41, (1 << 62) - 20, 1 << 63, U64 - 200]
_session_numbers = itertools.count()


@st.composite
def save_headers(draw):
    """SaveHeaders that are mostly valid in each respect (so both outcomes are common), has_bias false."""
    total = draw(st.integers(1, 40))
    sane = lambda: draw(st.integers(0, 9)) < 8  # noqa: E731 - each respect is valid 80% of the time
    number = next(_session_numbers)
    if sane():
        fragment = draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Zl", "Zp", "Cs")), max_size=12))
    else:
        fragment = draw(st.one_of(st.text(max_size=12), st.sampled_from(["é" * 120, "x" * 250, "x" * 260] + [f"a{ch}" for ch in REFUSED_ID_CHARS])))
    session_id = f"{fragment}#{number}"  # unique: no example sees another's session
    if sane():
        tenant = draw(st.sampled_from(["", "", "default", "t1", "tü", "t" * 256]))
    else:
        tenant = draw(st.one_of(st.sampled_from(["t" * 257, "é" * 129] + [f"t{ch}" for ch in REFUSED_ID_CHARS]), st.text(max_size=8)))
    # (no TTLs of seconds: such a session could expire between the checks below)
    if sane():
        ttl = draw(st.sampled_from([0, 0, 3600, MAX_TTL]))
    else:
        ttl = draw(st.one_of(st.sampled_from([MAX_TTL + 1, 9223372036854776, 1 << 63, U64]), st.integers(3600, U64)))
    kind = draw(st.sampled_from(["none", "none", "run", "gapped"]))
    positions: list[int] = []
    if kind == "run":
        step = draw(st.sampled_from([1, 2, 7]))
        start = draw(st.sampled_from([0, 1, 100, 4000]) if sane() else st.sampled_from(POSITION_STARTS))
        positions = [start + i * step for i in range(total)]
        if positions[-1] > U64:
            positions = [U64 - (total - 1 - i) * step for i in range(total)]
    elif kind == "gapped":
        positions = sorted(draw(st.lists(st.integers(0, 4095 if sane() else 4200), min_size=total, max_size=total, unique=True)))
    last = max(positions) if positions else total - 1
    if sane():
        logical = draw(st.sampled_from(["zero", "zero", "T", "last+1", "last+5", "window", "window+1"]))
    else:
        logical = draw(st.sampled_from(["T-1", "last", "2^62-1", "2^62", "huge"]))
    logical_length = {"zero": 0, "T": total, "T-1": total - 1, "last": last, "last+1": last + 1, "last+5": last + 5,
                      "window": TOY_SPEC.max_position, "window+1": TOY_SPEC.max_position + 1, "2^62-1": (1 << 62) - 1, "2^62": 1 << 62,
                      "huge": U64}[logical]
    # a first token of its own: the first writer of a prefix wins (dedup), so a shared prefix would restore another example's KV
    token_ids = [3_000_000_000 + number] + draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=total - 1, max_size=total - 1))
    return save_header(session_id, tokens=total, token_ids=token_ids,
                       tenant=tenant, ttl_seconds=ttl, positions=positions, logical_length=min(logical_length, U64), has_bias=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(header=save_headers())
def test_property_accepted_saves_round_trip_refused_ones_store_nothing(header, stub):
    before = snapshot(stub)
    code, details, layers = send_save(stub, header, seed=len(header.session_id))
    assert code not in NEVER, f"{code.name}: {details}"
    expected = contract_accepts(header)
    if code == OK:
        restored, got = restore_raw(stub, header.session_id, tenant=header.tenant)
        total = len(header.token_ids)
        positions = list(header.positions) or list(range(total))
        assert list(restored.token_ids) == list(header.token_ids)
        assert list(restored.positions) == positions
        assert restored.session.logical_length == (header.logical_length or max(positions) + 1)
        assert restored.session.num_tokens == total and not restored.session.has_bias
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, layers)), "KV not bit-exact"
        assert snapshot(stub)[0] == before[0] + 1
        assert expected, f"accepted a save the contract refuses: {header}"
    else:
        assert code == INVALID, f"{code.name}: {details}"
        lookup = code_of(lambda: stub.GetSession(pb.GetSessionRequest(tenant=header.tenant, session_id=header.session_id), timeout=TIMEOUT))[0]
        assert lookup in (grpc.StatusCode.NOT_FOUND, INVALID)
        assert snapshot(stub) == before
        assert not expected, f"refused a save the contract accepts ({details}): {header}"
