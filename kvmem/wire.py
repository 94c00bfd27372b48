"""Zero-copy protobuf encoding and decoding of KV chunk stream messages.

KV streams are almost all tensor bytes. The generated protobuf classes copy every bytes field
several times (into the message, when batching, when read back), which costs more than gRPC's own
transport. This module writes and reads the *same standard protobuf wire format* for the one hot
message shape, ``{Save,Append}SessionRequest.chunks`` / ``RestoreSessionResponse.chunks``
(field 2, a ``KVChunks``), without those copies:

* encoding joins headers and payload views once into the message buffer;
* decoding returns ``WireChunk`` objects whose ``keys``/``values``/``bias`` are memoryviews into
  the received buffer.

Every other message (headers, commits) goes through the generated classes. Any standard protobuf
peer interoperates: tests check byte-for-byte equality with ``SerializeToString`` and that the
decoder accepts what the generated classes produce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from kvmem.v1 import kvmem_pb2 as pb

CHUNKS_FIELD = 2  # the ``chunks`` field number in SaveSessionRequest, AppendSessionRequest, RestoreSessionResponse
_KVCHUNKS_ENTRY = 1  # KVChunks.chunks
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class WireFormatError(ValueError):
    """Bytes that are not a valid encoding of the expected message."""


@dataclass(frozen=True)
class WireChunk:
    """A decoded KVChunk; keys/values/bias are views into the received message (no copies)."""

    layer: int = 0
    token_start: int = 0
    num_tokens: int = 0
    dtype: int = 0
    keys: memoryview = memoryview(b"")
    values: memoryview = memoryview(b"")
    bias: memoryview = memoryview(b"")


@dataclass(frozen=True)
class StreamPart:
    """One decoded stream message: kind is "header", "chunks", "commit", or "" (empty message)."""

    kind: str
    message: Any = None  # the generated message for header/commit parts
    chunks: tuple[WireChunk, ...] = ()


# ---------------------------------------------------------------------------- encoding
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _chunk_parts(layer: int, token_start: int, num_tokens: int, dtype: int, keys, values, bias) -> tuple[int, list]:
    head = bytearray()
    for number, value in ((1, layer), (2, token_start), (3, num_tokens), (4, dtype)):
        if value:
            head += _varint(number << 3 | _VARINT) + _varint(value)
    parts: list = [bytes(head)]
    for number, data in ((5, keys), (6, values), (7, bias)):
        pieces = data if isinstance(data, (list, tuple)) else [] if data is None else [data]
        length = sum(len(piece) for piece in pieces)
        if length:
            parts += [_varint(number << 3 | _LENGTH) + _varint(length), *pieces]
    return sum(len(p) for p in parts), parts


def encode_chunk_messages(chunks: Iterable[tuple], max_bytes: int) -> Iterator[bytes]:
    """Encoded stream messages holding ``chunks`` in its field 2, each <= ~max_bytes of payload.

    chunks: (layer, token_start, num_tokens, dtype, keys, values, bias) with bytes-like payloads
    (C-contiguous, byte-formatted views are fine; bias may be None). A payload may also be a list
    of such buffers, written back to back: a [H, n, D] slice of a [H, T, D] tensor is H contiguous
    runs, so it needs no gathering copy before the one copy into the message.
    """
    batch: list = []
    size = 0
    for chunk in chunks:
        chunk_size, parts = _chunk_parts(*chunk)
        if batch and size + chunk_size > max_bytes:
            yield _finish(batch, size)
            batch, size = [], 0
        entry_head = _varint(_KVCHUNKS_ENTRY << 3 | _LENGTH) + _varint(chunk_size)
        batch += [entry_head, *parts]
        size += len(entry_head) + chunk_size
    if batch:
        yield _finish(batch, size)


def _finish(parts: list, size: int) -> bytes:
    return b"".join([_varint(CHUNKS_FIELD << 3 | _LENGTH) + _varint(size), *parts])


def serialize(message: Any) -> bytes:
    """Serializer for gRPC that passes pre-encoded bytes through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


# ---------------------------------------------------------------------------- decoding
def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError("truncated or overlong varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(view: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field in view[pos:end]."""
    while pos < end:
        tag, pos = _read_varint(view, pos, end)
        number, kind = tag >> 3, tag & 7
        if kind == _VARINT:
            value, pos = _read_varint(view, pos, end)
        elif kind == _LENGTH:
            length, pos = _read_varint(view, pos, end)
            if pos + length > end:
                raise WireFormatError("length-delimited field runs past the end of the message")
            value, pos = view[pos : pos + length], pos + length
        elif kind in (_FIXED64, _FIXED32):
            width = 8 if kind == _FIXED64 else 4
            if pos + width > end:
                raise WireFormatError("truncated fixed-width field")
            value, pos = int.from_bytes(view[pos : pos + width], "little"), pos + width
        else:
            raise WireFormatError(f"unsupported wire type {kind}")
        yield number, kind, value


_CHUNK_INT_FIELDS = {1: "layer", 2: "token_start", 3: "num_tokens", 4: "dtype"}
_CHUNK_BYTES_FIELDS = {5: "keys", 6: "values", 7: "bias"}


def _decode_chunk(view: memoryview) -> WireChunk:
    values: dict[str, Any] = {}
    for number, kind, value in _fields(view, 0, len(view)):
        if number in _CHUNK_INT_FIELDS and kind == _VARINT:
            values[_CHUNK_INT_FIELDS[number]] = value
        elif number in _CHUNK_BYTES_FIELDS and kind == _LENGTH:
            values[_CHUNK_BYTES_FIELDS[number]] = value
        elif number in _CHUNK_INT_FIELDS or number in _CHUNK_BYTES_FIELDS:
            raise WireFormatError(f"KVChunk field {number} has wire type {kind}")
    return WireChunk(**values)


def decode_stream_message(data: bytes, message_cls: Any) -> StreamPart:
    """Decode a Save/Append request or Restore response; chunk payloads stay views into ``data``."""
    view = memoryview(data)
    chunks: list[WireChunk] = []
    for number, kind, value in _fields(view, 0, len(view)):
        if number != CHUNKS_FIELD or kind != _LENGTH:
            message = message_cls.FromString(data)  # a header or commit: the generated class
            kind_name = message.WhichOneof("part") or ""
            return StreamPart(kind_name, getattr(message, kind_name) if kind_name else None)
        for entry_number, entry_kind, entry in _fields(value, 0, len(value)):
            if entry_number == _KVCHUNKS_ENTRY and entry_kind == _LENGTH:
                chunks.append(_decode_chunk(entry))
    return StreamPart("chunks" if chunks or len(view) else "", chunks=tuple(chunks))


def deserializer(message_cls: Any):
    """A gRPC deserializer returning StreamPart; malformed bytes become a "malformed" part."""

    def decode(data: bytes) -> StreamPart:
        try:
            return decode_stream_message(data, message_cls)
        except Exception as exc:  # noqa: BLE001 - reported to the handler as a bad request
            return StreamPart("malformed", message=str(exc))

    return decode


def as_part(message: Any) -> StreamPart:
    """A StreamPart for a generated message (for callers that already hold one)."""
    if isinstance(message, StreamPart):
        return message
    kind = message.WhichOneof("part") or ""
    if kind == "chunks":
        return StreamPart("chunks", chunks=tuple(message.chunks.chunks))
    return StreamPart(kind, getattr(message, kind) if kind else None)


RESTORE_METHOD = "/kvmem.v1.KVMem/RestoreSession"
SAVE_METHOD = "/kvmem.v1.KVMem/SaveSession"
APPEND_METHOD = "/kvmem.v1.KVMem/AppendSession"
__all__ = [
    "WireChunk", "StreamPart", "WireFormatError", "encode_chunk_messages", "decode_stream_message",
    "deserializer", "serialize", "as_part", "pb",
]
