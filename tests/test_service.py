"""The gRPC service on a real port: every bad input gets the right status, and nothing stored is hurt."""
import threading
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmem.client import Client
from kvmem.config import ServerConfig, ServiceConfig
from kvmem.convert import spec_to_pb
from kvmem.v1 import kvmem_pb2 as pb
from kvmem.v1 import kvmem_pb2_grpc as pb_grpc
from kvstore import errors
from kvstore.pieces import tensor_raw_view
from kvstore.spec import ModelSpec
from kvstore.store import StoreConfig
from tests.conftest import TOY_SPEC, random_layers

H, D, L = TOY_SPEC.num_kv_heads, TOY_SPEC.head_dim, TOY_SPEC.num_layers


@pytest.fixture
def stub(service):
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}", options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.KVMemStub(channel)
    channel.close()


@pytest.fixture
def kept(client):
    """A session saved before the bad input; it must survive every failure bit-exactly."""
    layers = random_layers(TOY_SPEC, 40, seed=99)
    client.save("kept", layers, list(range(40)))
    return layers


def assert_still_serving(client, kept_layers, port):
    restored = client.restore("kept")
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(restored.layers, kept_layers))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="kvmem.v1.KVMem"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def chunk(layer, start, n, dtype=pb.DTYPE_FLOAT32, heads=H, dim=D):
    keys = tensor_raw_view(torch.randn(heads, n, dim)).tobytes()
    return pb.KVChunk(layer=layer, token_start=start, num_tokens=n, dtype=dtype, keys=keys, values=keys)


def save_stream(session_id, chunks, tokens=8, commit=True, spec=TOY_SPEC):
    yield pb.SaveSessionRequest(header=pb.SaveHeader(session_id=session_id, model=spec_to_pb(spec), token_ids=list(range(tokens))))
    for c in chunks:
        yield pb.SaveSessionRequest(chunks=pb.KVChunks(chunks=[c]))
    if commit:
        yield pb.SaveSessionRequest(commit=pb.Commit(num_chunks=len(chunks)))


def expect(code, call, match=None):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    if match:
        assert match in info.value.details()
    return info.value.details()


BAD_SAVES = {
    "wrong shape": ([chunk(layer, 0, 8, heads=2) for layer in range(L)], "do not match shape"),
    "wrong dtype": ([chunk(layer, 0, 8, dtype=pb.DTYPE_FLOAT16) for layer in range(L)], "dtype"),
    "missing layer": ([chunk(layer, 0, 8) for layer in range(L - 1)], f"layer {L - 1}"),
    "layer out of range": ([chunk(layer, 0, 8) for layer in range(L)] + [chunk(L, 0, 8)], f"has {L} layers"),
    "token range outside": ([chunk(layer, 4, 8) for layer in range(L)], "outside"),
    "short layer": ([chunk(layer, 0, 8 if layer else 5) for layer in range(L)], "ended early"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAVES))
def test_bad_saves_are_invalid_argument_and_store_nothing(case, stub, client, kept, service):
    chunks, message = BAD_SAVES[case]
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.SaveSession(save_stream("bad", chunks)), message)
    expect(grpc.StatusCode.NOT_FOUND, lambda: stub.GetSession(pb.GetSessionRequest(session_id="bad")))
    assert client.stats().sessions == 1
    assert_still_serving(client, kept, service.port)


def test_stream_without_commit_stores_nothing(stub, client, kept, service):
    chunks = [chunk(layer, 0, 8) for layer in range(L)]
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.SaveSession(save_stream("early", chunks, commit=False)), "commit")
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.SaveSession(iter([pb.SaveSessionRequest(chunks=pb.KVChunks(chunks=chunks))])), "header")
    lying = list(save_stream("lie", chunks))[:-1] + [pb.SaveSessionRequest(commit=pb.Commit(num_chunks=99))]
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.SaveSession(iter(lying)), "99")
    assert client.stats().sessions == 1
    assert_still_serving(client, kept, service.port)


def test_cancelled_stream_stores_nothing(stub, client, kept, service):
    release = threading.Event()

    def hanging():
        yield from list(save_stream("cancelled", [chunk(layer, 0, 8) for layer in range(L)], commit=False))
        release.wait(10)

    future = stub.SaveSession.future(hanging())
    threading.Timer(0.5, future.cancel).start()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=10)
    release.set()
    expect(grpc.StatusCode.NOT_FOUND, lambda: stub.GetSession(pb.GetSessionRequest(session_id="cancelled")))
    assert_still_serving(client, kept, service.port)


def test_unknown_session_is_not_found_everywhere(client, kept, service):
    for call in (lambda: client.restore("nope"), lambda: client.get("nope"), lambda: client.delete("nope"),
                 lambda: client.fork("nope", "x"), lambda: client.append("nope", random_layers(TOY_SPEC, 3), [1])):
        with pytest.raises(errors.NotFound, match="nope"):
            call()
    assert_still_serving(client, kept, service.port)


def test_restore_into_another_model_is_failed_precondition(client, kept, service):
    other = ModelSpec("toy-model", L, H, D * 2, max_position=4096)
    with pytest.raises(errors.FailedPrecondition) as info:
        client.restore("kept", spec=other)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "head_dim" in str(info.value)
    assert_still_serving(client, kept, service.port)


@pytest.mark.parametrize("session_id", ["", "x" * 300])
def test_empty_or_oversized_session_id_is_invalid(session_id, client, kept, service):
    with pytest.raises(errors.InvalidRequest) as info:
        client.save(session_id, random_layers(TOY_SPEC, 4), [1, 2, 3, 4])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serving(client, kept, service.port)


def test_oversized_message_is_resource_exhausted(stub, client, kept, service):
    big = pb.KVChunk(layer=0, token_start=0, num_tokens=8, dtype=pb.DTYPE_FLOAT32, keys=b"\0" * (9 << 20), values=b"")
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: stub.SaveSession(save_stream("big", [big])))
    assert_still_serving(client, kept, service.port)


def test_lmdb_ceiling_over_grpc_is_resource_exhausted(tmp_path):
    from server import create_service

    config = ServiceConfig(
        server=ServerConfig(port=0, log_format="text"),
        store=StoreConfig(data_dir=tmp_path, chunk_tokens=64, cpu_tier_bytes=0, lmdb_map_bytes=1 << 20, lmdb_max_map_bytes=2 << 20),
    )
    service = create_service(config).start()
    try:
        with Client(f"127.0.0.1:{service.port}", spec=TOY_SPEC) as client:
            kept = random_layers(TOY_SPEC, 500, seed=1)
            client.save("kept", kept, list(range(500)))
            with pytest.raises(errors.CapacityExceeded) as info:
                client.save("huge", random_layers(TOY_SPEC, 3000, seed=2), list(range(1000, 4000)))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "ceiling" in str(info.value)
            assert [s.session_id for s in client.list()] == ["kept"]
            assert_still_serving(client, kept, service.port)
    finally:
        service.stop(grace=1)


def test_flipped_byte_on_disk_is_data_loss_never_data(tmp_path):
    from server import create_service

    config = ServiceConfig(server=ServerConfig(port=0, log_format="text"), store=StoreConfig(data_dir=tmp_path, chunk_tokens=16, lmdb_map_bytes=8 << 20))
    victim, kept = random_layers(TOY_SPEC, 32, seed=5), random_layers(TOY_SPEC, 32, seed=6)
    service = create_service(config).start()
    with Client(f"127.0.0.1:{service.port}", spec=TOY_SPEC) as client:
        client.save("victim", victim, list(range(32)))
        client.save("kept", kept, list(range(100, 132)))
    service.stop(grace=1)

    data_file = Path(tmp_path) / "lmdb" / "data.mdb"
    raw = bytearray(data_file.read_bytes())
    needle = tensor_raw_view(victim[2][1][:, 16:32]).tobytes()  # layer 2 values of the second chunk
    offsets = [raw.find(needle)]
    while offsets[-1] >= 0:
        offsets.append(raw.find(needle, offsets[-1] + 1))
    offsets.pop()
    assert offsets  # stale copy-on-write pages may hold an old copy too: flip the bit in each
    for offset in offsets:
        raw[offset + 100] ^= 0x04  # one bit, on disk
    data_file.write_bytes(bytes(raw))

    service = create_service(config).start()
    try:
        with Client(f"127.0.0.1:{service.port}", spec=TOY_SPEC) as client:
            with pytest.raises(errors.CorruptData) as info:
                client.restore("victim")
            assert info.value.code == grpc.StatusCode.DATA_LOSS and "checksum" in str(info.value)
            first_chunk = client.restore("victim", end=16)  # undamaged part still restores
            assert torch.equal(first_chunk.layers[2][1], victim[2][1][:, :16])
            assert client.get("victim").num_tokens == 32
            assert_still_serving(client, kept, service.port)
    finally:
        service.stop(grace=1)


def test_client_round_trip_list_stats_and_delete(client, kept):
    info = client.get("kept")
    assert info.num_tokens == 40 and info.model.name == TOY_SPEC.name and info.kv_bytes == 40 * TOY_SPEC.bytes_per_token
    fork = client.fork("kept", "branch", at_token=20)
    assert fork.shared_tokens == 16 and fork.copied_tokens == 4
    assert sorted(s.session_id for s in client.list(page_size=1)) == ["branch", "kept"]
    stats = client.stats()
    assert stats.sessions == 2 and stats.logical_bytes == 60 * TOY_SPEC.bytes_per_token
    assert {t.name for t in stats.tiers} == {"cpu", "lmdb"}
    assert client.delete("branch") > 0 and client.stats().sessions == 1
    part = client.restore("kept", start=5, end=30)
    assert part.token_ids.tolist() == list(range(5, 30)) and torch.equal(part.layers[1][0], kept[1][0][:, 5:30])
    prefix = client.restore_prefix(list(range(40)) + [7, 7])
    assert prefix.token_ids.tolist() == list(range(40))


def test_append_through_client_checks_length(client, kept):
    grown = [(torch.cat([k, torch.randn(H, 6, D)], 1), torch.cat([v, torch.randn(H, 6, D)], 1)) for k, v in kept]
    response = client.append("kept", grown, [1, 2, 3, 4, 5, 6])
    assert response.session.num_tokens == 46 and response.session.version == 2
    restored = client.restore("kept")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(restored.layers, grown))
    with pytest.raises(errors.Conflict):
        client.append("kept", grown, [1, 2, 3, 4, 5, 6])  # the cache no longer matches the stored length


def test_ttl_expiry_through_the_running_service(tmp_path):
    import time

    from server import create_service

    config = ServiceConfig(
        server=ServerConfig(port=0, log_format="text", maintenance_seconds=0.2),
        store=StoreConfig(data_dir=tmp_path, chunk_tokens=16, lmdb_map_bytes=8 << 20),
    )
    service = create_service(config).start()
    try:
        with Client(f"127.0.0.1:{service.port}", spec=TOY_SPEC) as client:
            client.save("brief", random_layers(TOY_SPEC, 20, seed=1), list(range(20)), ttl_seconds=1)
            client.save("lasting", random_layers(TOY_SPEC, 20, seed=2), list(range(50, 70)))
            assert client.get("brief").expires_at_ms > 0
            deadline = time.monotonic() + 10
            while client.stats().sessions != 1 and time.monotonic() < deadline:
                time.sleep(0.1)  # the maintenance thread collects it shortly after it expires
            assert client.stats().sessions == 1
            with pytest.raises(errors.NotFound):
                client.restore("brief")
            assert [s.session_id for s in client.list()] == ["lasting"]
    finally:
        service.stop(grace=1)
