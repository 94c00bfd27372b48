"""The zero-copy chunk codec speaks exactly the standard protobuf wire format."""
import grpc
import numpy as np
import pytest

from kvmem import wire
from kvmem.convert import spec_to_pb
from kvmem.v1 import kvmem_pb2 as pb
from tests.conftest import TOY_SPEC

CHUNKS = [
    (0, 0, 16, pb.DTYPE_FLOAT32, b"k" * 40, b"v" * 40, None),
    (3, 300, 2, pb.DTYPE_BFLOAT16, memoryview(np.arange(10, dtype=np.float32)).cast("B"), b"\x00" * 40, b"b" * 8),
    (1, 0, 0, 0, b"", b"", b""),  # zero-valued fields are omitted, as protobuf does
]


def generated(message_cls, chunks):
    return message_cls(chunks=pb.KVChunks(chunks=[
        pb.KVChunk(layer=l, token_start=s, num_tokens=n, dtype=d, keys=bytes(k), values=bytes(v), bias=bytes(b or b""))
        for l, s, n, d, k, v, b in chunks
    ]))


@pytest.mark.parametrize("message_cls", [pb.SaveSessionRequest, pb.AppendSessionRequest, pb.RestoreSessionResponse])
def test_encoding_is_byte_identical_to_protobuf(message_cls):
    encoded = list(wire.encode_chunk_messages(CHUNKS, max_bytes=1 << 20))
    assert encoded == [generated(message_cls, CHUNKS).SerializeToString()]
    assert message_cls.FromString(encoded[0]) == generated(message_cls, CHUNKS)


def test_batches_respect_the_size_budget():
    chunks = [(i, 0, 1, 1, b"x" * 1000, b"y" * 1000, None) for i in range(10)]
    messages = list(wire.encode_chunk_messages(chunks, max_bytes=4500))
    assert len(messages) == 5
    decoded = [c for m in messages for c in wire.decode_stream_message(m, pb.SaveSessionRequest).chunks]
    assert [c.layer for c in decoded] == list(range(10))


def test_decoding_protobuf_output_gives_views_of_the_buffer():
    data = generated(pb.RestoreSessionResponse, CHUNKS).SerializeToString()
    part = wire.decode_stream_message(data, pb.RestoreSessionResponse)
    assert part.kind == "chunks" and len(part.chunks) == 3
    first, second = part.chunks[0], part.chunks[1]
    assert (second.layer, second.token_start, second.num_tokens, second.dtype) == (3, 300, 2, pb.DTYPE_BFLOAT16)
    assert bytes(first.keys) == b"k" * 40 and bytes(second.bias) == b"b" * 8 and first.bias.nbytes == 0
    assert first.keys.obj is data  # no copy: a view into the received message


def test_headers_and_commits_use_the_generated_classes():
    header = pb.SaveSessionRequest(header=pb.SaveHeader(session_id="s", model=spec_to_pb(TOY_SPEC), token_ids=[1, 2]))
    part = wire.decode_stream_message(header.SerializeToString(), pb.SaveSessionRequest)
    assert part.kind == "header" and part.message.session_id == "s" and list(part.message.token_ids) == [1, 2]
    commit = wire.decode_stream_message(pb.SaveSessionRequest(commit=pb.Commit(num_chunks=7)).SerializeToString(), pb.SaveSessionRequest)
    assert commit.kind == "commit" and commit.message.num_chunks == 7


@pytest.mark.parametrize("garbage", [b"\x12\xff\xff\xff\xff\x0f", b"\x12\x05\x0a\x10abc", b"\x12\x02\x0a"])
def test_malformed_bytes_are_reported_not_raised(garbage):
    part = wire.deserializer(pb.SaveSessionRequest)(garbage)
    assert part.kind == "malformed" and part.message


def test_malformed_save_stream_is_invalid_argument_over_grpc(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        save = channel.stream_unary(wire.SAVE_METHOD, request_serializer=wire.serialize, response_deserializer=pb.SaveSessionResponse.FromString)
        header = pb.SaveSessionRequest(header=pb.SaveHeader(session_id="m", model=spec_to_pb(TOY_SPEC), token_ids=[1])).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            save(iter([header, b"\x12\x05\x0a\x10abc"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in info.value.details()
