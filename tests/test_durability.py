"""Durability across process death: graceful restarts, SIGKILL during concurrent saves, in-flight calls on SIGTERM."""
import threading
import time

import grpc
import pytest
import torch

from kvmem.client import Client
from kvstore import errors
from tests.conftest import TOY_SPEC, random_layers

pytestmark = pytest.mark.slow  # every test runs server processes, restarts and kills them (5-7 s each)


def same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_data_survives_graceful_restart(server_process, tmp_path):
    server = server_process(tmp_path / "d")
    layers = random_layers(TOY_SPEC, 300, seed=11)
    with Client(server.address, spec=TOY_SPEC) as client:
        client.save("s", layers, list(range(300)), ttl_seconds=3600)
        client.fork("s", "f", at_token=100)
    assert server.terminate() == 0
    output = server.process.stdout.read()
    assert "stopped" in output
    server = server_process(tmp_path / "d")
    with Client(server.address, spec=TOY_SPEC) as client:
        assert same(client.restore("s").layers, layers)
        assert same(client.restore("f").layers, [(k[:, :100], v[:, :100]) for k, v in layers])
        assert client.get("s").expires_at_ms > 0


def _kill_during_saves(server, tokens_of, at_least: int, pause: float = 0.0, timeout: float = 30.0) -> dict[str, int]:
    """4 writers save sessions (session w{worker}-{index}, seed worker*10000+index, tokens_of(seed)
    tokens, distinct token ids) until ``at_least`` are acknowledged; then SIGKILL the server.
    Returns the acknowledged saves: session id -> seed."""
    acknowledged: dict[str, int] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def writer(worker: int) -> None:
        with Client(server.address, spec=TOY_SPEC, timeout=timeout) as client:
            index = 0
            while not stop.is_set():
                session_id, seed = f"w{worker}-{index}", worker * 10_000 + index
                tokens = tokens_of(seed)
                try:
                    # distinct token ids per session: same tokens would (rightly) dedup to the same KV
                    client.save(session_id, random_layers(TOY_SPEC, tokens, seed=seed), list(range(seed * 10_000, seed * 10_000 + tokens)), reuse_prefix=False)
                except errors.KvmemError:
                    return  # the server died mid-call: this save was never acknowledged
                with lock:
                    acknowledged[session_id] = seed
                index += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    while len(acknowledged) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(pause)
    server.process.kill()  # SIGKILL, saves in flight
    server.process.wait(10)
    stop.set()
    for thread in threads:
        thread.join(timeout)
    assert len(acknowledged) >= at_least
    return dict(acknowledged)


def _small_tokens(seed: int) -> int:
    return 200 + (seed % 7) * 50


def test_sigkill_during_concurrent_saves_loses_no_acknowledged_save(server_process, tmp_path):
    acknowledged = _kill_during_saves(server_process(tmp_path / "d"), _small_tokens, 12)

    server = server_process(tmp_path / "d")
    with Client(server.address, spec=TOY_SPEC) as client:
        listed = {info.session_id: info for info in client.list()}
        assert set(acknowledged) <= set(listed)  # every acknowledged save survived
        for session_id, info in listed.items():  # and nothing partial is visible: every listed session is whole
            worker, index = session_id[1:].split("-")
            seed = int(worker) * 10_000 + int(index)
            tokens = _small_tokens(seed)
            assert info.num_tokens == tokens
            assert same(client.restore(session_id).layers, random_layers(TOY_SPEC, tokens, seed=seed))
        assert client.stats().sessions == len(listed)


def test_sigterm_lets_an_in_flight_save_finish(server_process, tmp_path):
    from kvmem.client import _iter_chunks, _stream
    from kvmem.convert import spec_to_pb
    from kvmem.v1 import kvmem_pb2 as pb
    from kvmem import wire

    server = server_process(tmp_path / "d")
    layers = random_layers(TOY_SPEC, 64, seed=21)
    header = pb.SaveHeader(session_id="slow", model=spec_to_pb(TOY_SPEC), token_ids=list(range(64)))
    sent_first = threading.Event()

    def slow_stream():
        for index, message in enumerate(_stream(pb.SaveSessionRequest(header=header), _iter_chunks(layers, 0, 64, 0, 16, None), pb.SaveSessionRequest)):
            yield message
            if index == 1:
                sent_first.set()
                time.sleep(1.5)  # SIGTERM arrives while this call is in flight

    with grpc.insecure_channel(server.address) as channel:
        save = channel.stream_unary(wire.SAVE_METHOD, request_serializer=wire.serialize, response_deserializer=pb.SaveSessionResponse.FromString)
        future = save.future(slow_stream())
        assert sent_first.wait(10)
        # "sent" is only queued on the client: give the server time to accept the call, so the
        # SIGTERM finds it in flight (a call the server never accepted is CANCELLED, storing nothing)
        time.sleep(0.5)
        server.process.terminate()
        response = future.result(timeout=20)
    assert response.session.num_tokens == 64
    assert server.process.wait(60) == 0  # generous: a loaded CI machine tears an interpreter down slowly
    server = server_process(tmp_path / "d")
    with Client(server.address, spec=TOY_SPEC) as client:
        assert same(client.restore("slow").layers, layers)


def test_sigkill_during_streaming_saves_keeps_acknowledged_ones_and_the_sweep_leaves_no_staged_block(server_process, tmp_path):
    """Sessions of ~6 MB: each stream writes (stages) blocks long before its commit."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    tokens = 8000
    server = server_process(tmp_path / "d", "--set", "store.chunk_tokens=64")
    acknowledged = _kill_during_saves(server, lambda seed: tokens, 6, pause=0.3, timeout=60)  # streams are mid-flight

    server = server_process(tmp_path / "d", "--set", "store.chunk_tokens=64")  # the start-up sweep runs here
    with Client(server.address, spec=TOY_SPEC) as client:
        listed = {info.session_id for info in client.list()}
        assert set(acknowledged) <= listed
        for session_id in listed:  # nothing partial is visible
            worker, index = session_id[1:].split("-")
            seed = int(worker) * 10_000 + int(index)
            assert same(client.restore(session_id).layers, random_layers(TOY_SPEC, tokens, seed=seed))
    assert server.terminate() == 0
    verify = subprocess.run([sys.executable, "-m", "kvmem.cli", "verify", "--json", "--data-dir", str(tmp_path / "d")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    report = json.loads(verify.stdout)
    assert report["ok"] and report["staged_entries"] == 0 and report["unreferenced_blocks"] == 0, report
