"""Admission control: idle streams are ended, stream counts are bounded, and open streams
never stall anyone else."""
from __future__ import annotations

import queue
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmem.client import Client
from kvmem.convert import spec_to_pb
from kvmem.v1 import kvmem_pb2 as pb
from kvmem.v1 import kvmem_pb2_grpc as pb_grpc
from tests.conftest import TOY_SPEC, random_layers


class HeldStream:
    """A SaveSession stream that sends its header and then waits until released."""

    def __init__(self, stub, session_id: str, tenant: str = ""):
        self._queue: queue.Queue = queue.Queue()
        header = pb.SaveHeader(tenant=tenant, session_id=session_id, model=spec_to_pb(TOY_SPEC), token_ids=list(range(8)))

        def messages():
            yield pb.SaveSessionRequest(header=header)
            while (message := self._queue.get()) is not None:
                yield message

        self.future = stub.SaveSession.future(messages(), timeout=120)

    def release(self) -> None:
        self._queue.put(None)

    def code(self, timeout: float = 30) -> grpc.StatusCode:
        try:
            self.future.result(timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def _wait_open(service, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while service.frontend.limits.open_streams() < count:
        assert time.monotonic() < deadline, f"only {service.frontend.limits.open_streams()} of {count} streams opened"
        time.sleep(0.02)


def test_a_silent_stream_is_ended_and_stores_nothing(start_service):
    service = start_service(server={"stream_idle_timeout_s": 0.5})
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.KVMemStub(channel)
        held = HeldStream(stub, "quiet")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            held.future.result(timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stream_idle_timeout_s" in info.value.details()
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetSession(pb.GetSessionRequest(session_id="quiet"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        held.release()
    assert service.frontend.limits.open_streams() == 0  # the slot was given back


def test_streams_are_limited_per_tenant_and_per_connection(start_service):
    service = start_service(server={"max_streams_per_tenant": 3, "max_streams_per_connection": 4})
    address = f"127.0.0.1:{service.port}"
    own = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    with grpc.insecure_channel(address, options=own) as one, grpc.insecure_channel(address, options=own) as two, grpc.insecure_channel(address, options=own) as three:
        first, second = pb_grpc.KVMemStub(one), pb_grpc.KVMemStub(two)
        held = [HeldStream(first, f"a{i}", tenant="a") for i in range(3)]
        _wait_open(service, 3)
        over = HeldStream(second, "a3", tenant="a")  # another connection, same tenant: over the tenant's 3
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.append(HeldStream(first, "b0", tenant="b"))  # the connection's 4th: fine
        _wait_open(service, 4)
        crowded = HeldStream(first, "c0", tenant="c")  # the connection's 5th
        assert crowded.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = crowded.future.exception().details()
        assert "max_streams_per_connection" in details
        # another tenant on another connection is not affected
        fresh = HeldStream(pb_grpc.KVMemStub(three), "c1", tenant="c")
        _wait_open(service, 5)
        for stream in [*held, fresh]:
            stream.release()
        assert all(stream.code() == grpc.StatusCode.INVALID_ARGUMENT for stream in [*held, fresh])  # ended before its commit
    assert service.frontend.limits.open_streams() == 0


def test_256_idle_streams_do_not_stall_other_calls(start_service):
    service = start_service(server={"max_streams_per_tenant": 64, "max_streams_per_connection": 32, "stream_idle_timeout_s": 120})
    address = f"127.0.0.1:{service.port}"
    layers = random_layers(TOY_SPEC, 64, seed=11)
    with Client(address, spec=TOY_SPEC, timeout=10) as client:
        client.save("other", layers, list(range(64)))
        channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
        try:
            held = [HeldStream(pb_grpc.KVMemStub(channels[i % 8]), f"idle-{i}", tenant=f"t{i % 4}") for i in range(256)]
            _wait_open(service, 256, timeout=60)
            with grpc.insecure_channel(address) as probe:
                health = health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(service="kvmem.v1.KVMem"), timeout=2)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert client.stats().sessions == 1
            restored = client.restore("other")
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(layers, restored.layers))
            assert service.frontend.limits.open_streams() == 256
            for stream in held:
                stream.release()
            assert {stream.code() for stream in held} == {grpc.StatusCode.INVALID_ARGUMENT}
        finally:
            for channel in channels:
                channel.close()
    assert service.frontend.limits.open_streams() == 0


def test_calls_keep_working_while_streams_come_and_go(start_service):
    """Streams refused at the limit and streams ended by a client cancel both give their slot back."""
    service = start_service(server={"max_streams_per_tenant": 2})
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.KVMemStub(channel)
        for _ in range(5):
            pair = [HeldStream(stub, f"s{i}") for i in range(2)]
            _wait_open(service, 2)
            pair[0].future.cancel()
            pair[1].release()
            assert pair[1].code() == grpc.StatusCode.INVALID_ARGUMENT
            deadline = time.monotonic() + 10
            while service.frontend.limits.open_streams():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            pair[0].release()
