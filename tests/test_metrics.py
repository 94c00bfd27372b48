"""Operability: Prometheus metrics over HTTP, and gRPC server reflection."""
from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmem.client import Client
from kvmem.config import MetricsConfig
from kvstore import errors
from tests.conftest import TOY_SPEC, random_layers


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a real HTTP scrape of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metered(start_service):
    return start_service(metrics=MetricsConfig(enabled=True, port=0))


def test_metrics_move_by_the_right_amounts(metered):
    assert metered.metrics_port > 0
    before = scrape(metered.metrics_port)
    layers = random_layers(TOY_SPEC, 40, seed=3)
    with Client(f"127.0.0.1:{metered.port}", spec=TOY_SPEC, timeout=30) as client:
        saved = client.save("m", layers, list(range(40)))
        client.restore("m")
        with pytest.raises(errors.NotFound):
            client.get("missing")
        with pytest.raises(errors.InvalidRequest):
            client.fork("m", "bad\u0085id")
    after = scrape(metered.metrics_port)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("kvmem_requests_total", method="SaveSession", code="OK") == 1
    assert moved("kvmem_requests_total", method="Lookup", code="OK") == 1  # the client's save asks first
    assert moved("kvmem_requests_total", method="RestoreSession", code="OK") == 1
    assert moved("kvmem_requests_total", method="GetSession", code="NOT_FOUND") == 1
    assert moved("kvmem_requests_total", method="ForkSession", code="INVALID_ARGUMENT") == 1
    assert moved("kvmem_request_seconds_count", method="SaveSession") == 1
    assert moved("kvmem_request_seconds_count", method="GetSession") == 1
    kv_bytes = 40 * TOY_SPEC.bytes_per_token
    assert kv_bytes < moved("kvmem_received_bytes_total", method="SaveSession") < kv_bytes * 1.1
    assert kv_bytes < moved("kvmem_sent_bytes_total", method="RestoreSession") < kv_bytes * 1.1
    assert value(after, "kvmem_sessions") == 1 and value(after, "kvmem_tenant_sessions", tenant="default") == 1
    assert value(after, "kvmem_stored_bytes") == value(after, "kvmem_tenant_stored_bytes", tenant="default") == saved.bytes_written
    assert value(after, "kvmem_logical_bytes") == kv_bytes and value(after, "kvmem_dedup_ratio") == pytest.approx(kv_bytes / saved.bytes_written)
    assert value(after, "kvmem_lmdb_max_map_bytes") == metered.config.store.lmdb_max_map_bytes
    assert value(after, "kvmem_tier_bytes", tier="cpu") > 0 and value(after, "kvmem_open_streams") == 0


def test_auth_failures_are_counted(start_service, tmp_path):
    from kvmem import auth
    from kvmem.config import AuthConfig

    keys = tmp_path / "keys.toml"
    _, token = auth.add_key(keys, "t1")
    service = start_service(auth=AuthConfig(keys_file=str(keys)), metrics=MetricsConfig(enabled=True, port=0))
    with Client(f"127.0.0.1:{service.port}", timeout=10) as anonymous:
        for _ in range(3):
            with pytest.raises(errors.Unauthenticated):
                anonymous.list_page()
    with Client(f"127.0.0.1:{service.port}", token=token, tenant="t2", timeout=10) as trespasser:
        with pytest.raises(errors.PermissionDenied):
            trespasser.list_page()
    samples = scrape(service.metrics_port)
    assert value(samples, "kvmem_auth_failures_total", reason="unauthenticated") == 3
    assert value(samples, "kvmem_auth_failures_total", reason="permission_denied") == 1
    assert value(samples, "kvmem_requests_total", method="ListSessions", code="UNAUTHENTICATED") == 3


def test_reflection_lists_the_services(service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"kvmem.v1.KVMem", "grpc.health.v1.Health"} <= names
        described = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvmem.v1.KVMem")]), timeout=10))
        assert described[0].file_descriptor_response.file_descriptor_proto  # enough for grpcurl to call it
