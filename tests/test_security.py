"""The trusted front end: tenants from identity, TLS, safe defaults, quotas, audit log.

Every server here is real (a port on 127.0.0.1, LMDB in a temp dir); clients are the project's
client or raw stubs written from the proto, as an outside caller would.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmem import auth
from kvmem.client import Client
from kvmem.config import AuthConfig, ConfigError, QuotaConfig, TlsConfig
from kvmem.convert import spec_to_pb
from kvmem.tls import ClientTLS
from kvmem.v1 import kvmem_pb2 as pb
from kvmem.v1 import kvmem_pb2_grpc as pb_grpc
from kvstore import errors
from tests.certs import CA
from tests.conftest import REPO, TOY_SPEC, random_layers, service_config


@dataclasses.dataclass
class Keys:
    path: object
    tokens: dict  # name -> token
    ids: dict  # name -> key id


@pytest.fixture
def keys(tmp_path) -> Keys:
    path = tmp_path / "keys.toml"
    tokens, ids = {}, {}
    for name, tenant, role, extra in (("a", "tenant-a", "tenant", {}), ("b", "tenant-b", "tenant", {}), ("admin", "ops", "admin", {}),
                                      ("small", "tenant-small", "tenant", {"max_sessions": 2, "max_stored_bytes": 0})):
        entry, token = auth.add_key(path, tenant, role, **extra)
        tokens[name], ids[name] = token, entry.key_id
    return Keys(path, tokens, ids)


@pytest.fixture
def secured(start_service, keys):
    return start_service(auth=AuthConfig(keys_file=str(keys.path)))


def _client(service, token=None, **kw) -> Client:
    return Client(f"127.0.0.1:{service.port}", token=token, spec=TOY_SPEC, timeout=30, **kw)


def _same(layers, restored) -> bool:
    return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(layers, restored.layers))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _metadata(token):
    return (("authorization", f"Bearer {token}"),)


# ---------------------------------------------------------------------------- identity
def test_no_or_unknown_token_is_unauthenticated_and_health_stays_open(secured, keys):
    with _client(secured) as anonymous:
        with pytest.raises(errors.Unauthenticated, match="requires credentials"):
            anonymous.list_page()
    with _client(secured, token="kvmem_not-a-key") as stranger:
        with pytest.raises(errors.Unauthenticated, match="unknown or revoked"):
            stranger.stats()
    with grpc.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = pb_grpc.KVMemStub(channel)
        for scheme in ("Basic abc", "Bearer", "bearer " + keys.tokens["a"][:-1]):
            assert _code(lambda: stub.GetStats(pb.GetStatsRequest(), metadata=(("authorization", scheme),))) == grpc.StatusCode.UNAUTHENTICATED
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="kvmem.v1.KVMem"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_the_tenant_comes_from_the_token(secured, keys):
    layers = random_layers(TOY_SPEC, 40, seed=1)
    with _client(secured, keys.tokens["a"]) as a:
        saved = a.save("chat", layers, list(range(40)))
        assert saved.session.tenant == "tenant-a"
        assert [s.session_id for s in a.list()] == ["chat"]
        assert _same(layers, a.restore("chat"))
    with _client(secured, keys.tokens["a"], tenant="tenant-a") as explicit:
        assert explicit.get("chat").tenant == "tenant-a"  # naming one's own tenant is fine


def _victim(secured, keys):
    layers = random_layers(TOY_SPEC, 40, seed=2)
    with _client(secured, keys.tokens["a"]) as a:
        a.save("secret", layers, list(range(40)))
    return layers


def _calls_naming(tenant: str, spec=TOY_SPEC):
    """One request per RPC that names ``tenant`` and A's session "secret"."""
    model = spec_to_pb(spec)
    header = pb.SaveHeader(tenant=tenant, session_id="secret", model=model, token_ids=list(range(8)), overwrite=True)
    append = pb.AppendHeader(tenant=tenant, session_id="secret", model=model, token_ids=[1])
    return {
        "SaveSession": lambda stub, md: stub.SaveSession(iter([pb.SaveSessionRequest(header=header)]), metadata=md),
        "AppendSession": lambda stub, md: stub.AppendSession(iter([pb.AppendSessionRequest(header=append)]), metadata=md),
        "RestoreSession": lambda stub, md: list(stub.RestoreSession(pb.RestoreSessionRequest(tenant=tenant, session_id="secret"), metadata=md)),
        "RestorePrefix": lambda stub, md: list(stub.RestoreSession(pb.RestoreSessionRequest(tenant=tenant, model=model, lookup_token_ids=list(range(40))), metadata=md)),
        "ForkSession": lambda stub, md: stub.ForkSession(pb.ForkSessionRequest(tenant=tenant, source_session_id="secret", target_session_id="mine"), metadata=md),
        "Lookup": lambda stub, md: stub.Lookup(pb.LookupRequest(tenant=tenant, model=model, token_ids=list(range(40))), metadata=md),
        "GetSession": lambda stub, md: stub.GetSession(pb.GetSessionRequest(tenant=tenant, session_id="secret"), metadata=md),
        "ListSessions": lambda stub, md: stub.ListSessions(pb.ListSessionsRequest(tenant=tenant), metadata=md),
        "DeleteSession": lambda stub, md: stub.DeleteSession(pb.DeleteSessionRequest(tenant=tenant, session_id="secret"), metadata=md),
        "GetStats": lambda stub, md: stub.GetStats(pb.GetStatsRequest(tenant=tenant), metadata=md),
        "Compact": lambda stub, md: stub.Compact(pb.CompactRequest(tenant=tenant, session_id="secret", method="streaming_llm", ratio=0.5), metadata=md),
        "CompactStream": lambda stub, md: stub.CompactStream(iter([pb.CompactStreamRequest(request=pb.CompactRequest(
            tenant=tenant, session_id="secret", method="streaming_llm", ratio=0.5))]), metadata=md),
        "Retrieve": lambda stub, md: list(stub.Retrieve(pb.RetrieveRequest(tenant=tenant, session_id="secret", query_token_ids=[1], budget_tokens=8), metadata=md)),
        "SearchText": lambda stub, md: stub.SearchText(pb.SearchTextRequest(tenant=tenant, session_id="secret", query="code"), metadata=md),
        "Plan": lambda stub, md: stub.Plan(pb.PlanRequest(tenant=tenant, session_id="secret", query="code?"), metadata=md),
        "Answer": lambda stub, md: stub.Answer(pb.PlanRequest(tenant=tenant, session_id="secret", query="code?"), metadata=md),
    }


def test_cross_tenant_matrix_never_returns_data(secured, keys):
    """B's token against A's sessions: naming A is PERMISSION_DENIED on every RPC; acting as
    itself, B finds nothing of A's (NOT_FOUND), and A's session is untouched throughout."""
    layers = _victim(secured, keys)
    b = _metadata(keys.tokens["b"])
    with grpc.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = pb_grpc.KVMemStub(channel)
        for name, call in _calls_naming("tenant-a").items():
            assert _code(lambda: call(stub, b)) == grpc.StatusCode.PERMISSION_DENIED, name
        as_itself = _calls_naming("")
        for name in ("RestoreSession", "RestorePrefix", "ForkSession", "GetSession", "DeleteSession", "Compact", "CompactStream", "Retrieve", "SearchText", "Plan",
                     "Answer", "AppendSession"):
            code = _code(lambda: as_itself[name](stub, b))
            assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), (name, code)
        assert as_itself["Lookup"](stub, b).matched_tokens == 0
        assert as_itself["ListSessions"](stub, b).sessions == []
        stats = as_itself["GetStats"](stub, b)
        assert stats.usage.tenant == "tenant-b" and stats.usage.sessions == 0 and stats.sessions == 0 and not stats.tiers
    with _client(secured, keys.tokens["a"]) as a:
        assert _same(layers, a.restore("secret"))
        assert [s.session_id for s in a.list()] == ["secret"]


def test_a_save_of_another_tenants_exact_prefix_writes_its_own_bytes(secured, keys):
    layers = _victim(secured, keys)
    zeros = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in layers]
    with _client(secured, keys.tokens["b"]) as b:
        assert b.lookup(list(range(40))) == 0  # B never learns that A holds this prefix
        saved = b.save("copycat", zeros, list(range(40)))
        assert saved.deduplicated_tokens == 0 and saved.bytes_written > 0
    with _client(secured, keys.tokens["a"]) as a:
        again = a.save("again", layers, list(range(40)))
        assert again.deduplicated_tokens == 40  # A deduplicates against its own KV, never B's zeros
        assert _same(layers, a.restore("again")) and _same(layers, a.restore("secret"))


def test_admin_acts_for_any_tenant_and_sees_totals(secured, keys):
    layers = _victim(secured, keys)
    with _client(secured, keys.tokens["b"]) as b:
        b.save("other", random_layers(TOY_SPEC, 20, seed=3), list(range(20)))
        mine = b.stats()
        assert mine.sessions == 0 and mine.stored_bytes == 0 and not mine.tiers  # no totals for a tenant
        assert mine.usage.sessions == 1 and mine.usage.stored_bytes > 0
    with _client(secured, keys.tokens["admin"], tenant="tenant-a") as admin:
        assert _same(layers, admin.restore("secret"))
        assert [s.session_id for s in admin.list()] == ["secret"]
        totals = admin.stats()
        assert totals.sessions == 2 and totals.tiers and totals.usage.tenant == "tenant-a" and totals.usage.sessions == 1
        admin.delete("secret")
    with _client(secured, keys.tokens["a"]) as a:
        assert list(a.list()) == []


def test_keys_reload_without_dropping_calls(secured, keys, tmp_path):
    entry, token = auth.add_key(keys.path, "tenant-new")
    with _client(secured, token) as newcomer:
        with pytest.raises(errors.Unauthenticated):
            newcomer.list_page()
        with _client(secured, keys.tokens["a"]) as a:
            stop = time.monotonic() + 1.0
            assert secured.reload_keys()
            assert newcomer.list_page().sessions == []
            while time.monotonic() < stop:  # calls keep working across a reload
                a.stats()
                secured.reload_keys()
        auth.remove_key(keys.path, entry.key_id)
        assert secured.reload_keys()
        with pytest.raises(errors.Unauthenticated):
            newcomer.list_page()
    keys.path.write_text("[keys.broken\n")  # a broken file keeps the previous keys
    assert not secured.reload_keys()
    with _client(secured, keys.tokens["a"]) as a:
        assert a.stats().usage.tenant == "tenant-a"


def test_keys_file_never_holds_a_token(keys):
    text = keys.path.read_text()
    assert all(token not in text for token in keys.tokens.values()) and "kvmem_wrong" not in text
    assert auth.token_digest(keys.tokens["a"]).hex() in text
    assert oct(keys.path.stat().st_mode & 0o777) == "0o600"
    entries = auth.list_keys(keys.path)
    assert {e.tenant for e in entries} == {"tenant-a", "tenant-b", "ops", "tenant-small"}
    with pytest.raises(auth.KeysFileError, match="tenant"):
        auth.parse_keys('[keys.x]\nsha256 = "' + "0" * 64 + '"\ntenant = "a\\u0085b"\n')
    with pytest.raises(auth.KeysFileError, match="unknown fields"):
        auth.parse_keys('[keys.x]\nsha256 = "' + "0" * 64 + '"\ntenant = "a"\ntoken = "plain"\n')


@pytest.mark.slow
def test_cli_keys_add_prints_a_token_that_works(secured, keys):
    done = subprocess.run([sys.executable, "-m", "kvmem.cli", "keys", "--keys-file", str(keys.path), "add", "--tenant", "cli-tenant"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("kvmem_") and token not in keys.path.read_text()
    secured.reload_keys()
    listed = subprocess.run([sys.executable, "-m", "kvmem.cli", "--address", f"127.0.0.1:{secured.port}", "stats"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, env={"KVMEM_TOKEN": token, "PATH": "/usr/bin:/bin"})
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["usage"]["tenant"] == "cli-tenant"


def test_sighup_reloads_the_keys_file(server_process, keys, tmp_path):
    server = server_process(tmp_path / "hup", "--keys-file", str(keys.path))
    entry, token = auth.add_key(keys.path, "late-tenant")
    with Client(server.address, token=token, spec=TOY_SPEC, timeout=10) as late:
        with pytest.raises(errors.Unauthenticated):
            late.list_page()
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert late.stats().usage.tenant == "late-tenant"
                break
            except errors.Unauthenticated:
                assert time.monotonic() < deadline, "SIGHUP did not reload the keys file"
                time.sleep(0.1)
    assert server.terminate() == 0


# ---------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CA(folder / "ca"), CA(folder / "rogue", "rogue CA")
    return {"ca": ca, "rogue": rogue, "server": ca.issue("kvmem-server", server=True), "client": ca.issue("tenant-cert", server=False),
            "rogue_client": rogue.issue("tenant-cert", server=False)}


def test_tls_handshake_and_plaintext_refused(start_service, pki, keys):
    service = start_service(tls=TlsConfig(cert_file=str(pki["server"].cert_file), key_file=str(pki["server"].key_file)), auth=AuthConfig(keys_file=str(keys.path)))
    layers = random_layers(TOY_SPEC, 24, seed=4)
    with _client(service, keys.tokens["a"], tls=ClientTLS(ca_file=str(pki["ca"].pem.cert_file))) as secure:
        secure.save("tls", layers, list(range(24)))
        assert _same(layers, secure.restore("tls"))
    with Client(f"127.0.0.1:{service.port}", token=keys.tokens["a"], timeout=5) as plaintext:
        with pytest.raises(errors.Unavailable):
            plaintext.list_page()
    with Client(f"127.0.0.1:{service.port}", token=keys.tokens["a"], timeout=5, tls=str(pki["rogue"].pem.cert_file)) as wrong_ca:
        with pytest.raises(errors.Unavailable):
            wrong_ca.list_page()


def test_mutual_tls_takes_the_tenant_from_the_certificate(start_service, pki, keys):
    server, ca = pki["server"], pki["ca"].pem.cert_file
    service = start_service(tls=TlsConfig(cert_file=str(server.cert_file), key_file=str(server.key_file), client_ca_file=str(ca)),
                            auth=AuthConfig(keys_file=str(keys.path)))
    good = ClientTLS(ca_file=str(ca), cert_file=str(pki["client"].cert_file), key_file=str(pki["client"].key_file))
    with _client(service, tls=good) as by_cert:
        by_cert.save("m", random_layers(TOY_SPEC, 8), list(range(8)))
        assert by_cert.get("m").tenant == "tenant-cert"
    with Client(f"127.0.0.1:{service.port}", tls=good, tenant="tenant-a", timeout=5) as naming_another:
        with pytest.raises(errors.PermissionDenied):
            naming_another.list_page()
    with _client(service, keys.tokens["a"], tls=good) as token_wins:  # a token names the tenant even over a certificate
        assert token_wins.stats().usage.tenant == "tenant-a"
    for bad in (ClientTLS(ca_file=str(ca)),  # no client certificate
                ClientTLS(ca_file=str(ca), cert_file=str(pki["rogue_client"].cert_file), key_file=str(pki["rogue_client"].key_file))):
        with Client(f"127.0.0.1:{service.port}", tls=bad, timeout=5) as refused:
            with pytest.raises(errors.Unavailable):
                refused.list_page()


def test_mutual_tls_alone_is_authentication(start_service, pki, tmp_path):
    server, ca = pki["server"], pki["ca"].pem.cert_file
    service = start_service(tls=TlsConfig(cert_file=str(server.cert_file), key_file=str(server.key_file), client_ca_file=str(ca)))
    good = ClientTLS(ca_file=str(ca), cert_file=str(pki["client"].cert_file), key_file=str(pki["client"].key_file))
    with _client(service, tls=good) as by_cert:
        assert by_cert.stats().usage.tenant == "tenant-cert" and by_cert.stats().sessions == 0  # a tenant, no totals
    with Client(f"127.0.0.1:{service.port}", tls=good, tenant="someone-else", timeout=5) as naming_another:
        with pytest.raises(errors.PermissionDenied):
            naming_another.list_page()
    from server import check_security

    tls = TlsConfig(cert_file=str(server.cert_file), key_file=str(server.key_file), client_ca_file=str(ca))
    check_security(service_config(tmp_path, server={"host": "0.0.0.0"}, tls=tls))  # certificates authenticate


# ---------------------------------------------------------------------------- safe defaults
def test_refuses_to_listen_beyond_loopback_without_auth_and_tls(tmp_path, keys, pki):
    from server import check_security

    for host in ("0.0.0.0", "::", "10.1.2.3", "kvmem.example"):
        with pytest.raises(ConfigError, match="auth.keys_file and tls.cert_file"):
            check_security(service_config(tmp_path, server={"host": host}))
    with pytest.raises(ConfigError, match="tls.cert_file"):
        check_security(service_config(tmp_path, server={"host": "0.0.0.0"}, auth=AuthConfig(keys_file=str(keys.path))))
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.8.9.10"):
        check_security(service_config(tmp_path, server={"host": host}))
    check_security(service_config(tmp_path, server={"host": "0.0.0.0", "insecure": True}))
    tls = TlsConfig(cert_file=str(pki["server"].cert_file), key_file=str(pki["server"].key_file))
    check_security(service_config(tmp_path, server={"host": "0.0.0.0"}, auth=AuthConfig(keys_file=str(keys.path)), tls=tls))


@pytest.mark.slow
def test_server_process_refuses_0000_and_starts_with_insecure(tmp_path):
    command = [sys.executable, str(REPO / "server.py"), "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d"), "--set", "model.prepare=false"]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--insecure" in refused.stderr and "auth.keys_file" in refused.stderr
    port_file = tmp_path / "port"
    process = subprocess.Popen([*command, "--insecure", "--set", f"server.port_file={port_file}", "--set", "server.log_format=json"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, "server did not start with --insecure"
            time.sleep(0.05)
        with Client(f"127.0.0.1:{port_file.read_text()}", timeout=10) as client:
            assert client.list_page().sessions == []
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert "INSECURE" in output  # the log says so at every start


# ---------------------------------------------------------------------------- quotas
def test_quotas_refuse_the_save_that_would_exceed_and_free_on_delete(start_service, keys):
    service = start_service(auth=AuthConfig(keys_file=str(keys.path)), quota=QuotaConfig(max_stored_bytes=200_000))
    one = random_layers(TOY_SPEC, 40, seed=5)  # 4 layers x 2 x 3 x 40 x 8 x 4 bytes = 30 KB
    with _client(service, keys.tokens["small"]) as small:  # max_sessions = 2, bytes unlimited by its key
        small.save("s1", one, list(range(40)))
        small.save("s2", random_layers(TOY_SPEC, 40, seed=6), [t + 1000 for t in range(40)])
        with pytest.raises(errors.CapacityExceeded, match="max_sessions"):
            small.save("s3", random_layers(TOY_SPEC, 8, seed=7), list(range(8)))
        usage = small.stats().usage
        assert (usage.sessions, usage.max_sessions, usage.max_stored_bytes) == (2, 2, 0)
        assert _same(one, small.restore("s1"))
        small.delete("s2")
        small.save("s3", random_layers(TOY_SPEC, 8, seed=7), list(range(500, 508)))
    with _client(service, keys.tokens["a"]) as a:  # the [quota] default: 200 kB
        a.save("fits", random_layers(TOY_SPEC, 160, seed=8), list(range(160)))  # 123 kB
        before = a.stats().usage
        with pytest.raises(errors.CapacityExceeded, match="max_stored_bytes"):
            a.save("too-much", random_layers(TOY_SPEC, 160, seed=9), list(range(2000, 2160)))
        assert a.stats().usage == before
        with pytest.raises(errors.NotFound):
            a.get("too-much")
        a.delete("fits")
        a.save("too-much", random_layers(TOY_SPEC, 160, seed=9), list(range(2000, 2160)))
        assert a.stats().usage.max_stored_bytes == 200_000


# ---------------------------------------------------------------------------- audit
def test_one_audit_line_per_state_changing_call_and_never_a_token(secured, keys, caplog):
    caplog.set_level(logging.INFO, logger="kvmem.audit")
    with _client(secured, keys.tokens["a"]) as a:
        a.save("audited", random_layers(TOY_SPEC, 20), list(range(20)))
        a.fork("audited", "branch")
        a.get("audited")  # a read: no audit line
        with pytest.raises(errors.AlreadyExists):
            a.save("audited", random_layers(TOY_SPEC, 20), list(range(20)))
        a.delete("branch")
    with _client(secured, "kvmem_wrong") as stranger:
        with pytest.raises(errors.Unauthenticated):
            stranger.delete("audited")
    lines = [r.fields for r in caplog.records if r.name == "kvmem.audit"]
    assert [(f["rpc"], f["session"], f["outcome"]) for f in lines] == [
        ("SaveSession", "audited", "OK"), ("ForkSession", "branch", "OK"), ("SaveSession", "audited", "ALREADY_EXISTS"), ("DeleteSession", "branch", "OK"),
        ("DeleteSession", "", "UNAUTHENTICATED")]
    assert all(f["tenant"] == "tenant-a" and f["key_id"] == keys.ids["a"] for f in lines[:4])
    assert lines[4]["tenant"] == "" and lines[4]["key_id"] == "" and lines[4]["peer"]
    assert lines[0]["bytes"] > 0 and lines[3]["bytes"] >= 0
    text = "\n".join(r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    assert all(token not in text for token in keys.tokens.values()) and "kvmem_wrong" not in text
