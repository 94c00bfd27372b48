"""`kvmem compact --ray` on a local Ray cluster (2 CPUs, 2 workers): through the shared Redis
backend the stored results equal a single-process run bit for bit; a rerun skips everything; a
failing session is reported while the others finish; through a kvmem server's gRPC too."""
import itertools
import os

import numpy as np
import pytest
import torch

from kvmem.batch_compact import Job, StoreCompactor, StoreWorkerConfig
from kvmem.cli import main
from kvstore.store import SessionStore, StoreConfig
from tests.conftest import TOY_SPEC, random_layers
from tests.test_store import pieces_for

pytestmark = pytest.mark.slow

TENANT = "t"
_names = itertools.count()


def eight_sessions() -> dict:
    """Four prefixes of one context (they share chunks) and four of their own (unaligned lengths)."""
    base = random_layers(TOY_SPEC, 80, seed=10)
    sessions = {}
    for index, length in enumerate((16, 40, 56, 80)):
        sessions[f"shared-{index}"] = (np.arange(length), [(k[:, :length].contiguous(), v[:, :length].contiguous()) for k, v in base])
    for index, length in enumerate((24, 33, 48, 61)):
        sessions[f"own-{index}"] = (np.arange(length) + 1000 * (index + 1), random_layers(TOY_SPEC, length, seed=20 + index))
    return sessions


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20)
    yield ray
    ray.shutdown()


@pytest.fixture
def namespaces(redis_cluster, tmp_path):
    """Two fresh namespaces holding the same eight sessions: one for Ray, one for a single process."""
    configs = []
    for side in ("ray", "single"):
        config = StoreConfig(data_dir=tmp_path / side, chunk_tokens=16, cpu_tier_bytes=8 << 20, backend="redis",
                             redis_url=redis_cluster.url, redis_namespace=f"raycompact-{next(_names)}-{side}-{os.getpid()}")
        store = SessionStore.open(config)
        for session_id, (tokens, layers) in eight_sessions().items():
            store.save(TENANT, session_id, TOY_SPEC, tokens, pieces_for(store, layers))
        store.close()
        configs.append(config)
    return configs


def ray_cli(config, *args) -> int:
    return main(["--tenant", TENANT, "compact", *args, "--ray", "--ray-workers", "2", "--store-url", config.redis_url,
                 "--store-namespace", config.redis_namespace, "--store-chunk-tokens", str(config.chunk_tokens), "--model", ""])


def single_process(config, job: Job, session_ids, model: str = "") -> StoreCompactor:
    compactor = StoreCompactor(StoreWorkerConfig(config, TENANT, model=model, threads=1))
    for session_id in session_ids:
        try:
            compactor.compact(job, session_id)
        except Exception:  # noqa: BLE001 - the Ray run reports the same sessions as failed
            pass
    return compactor


def stored(config, session_id):
    store = SessionStore.open(config)
    try:
        record = store.get(TENANT, session_id)
        keys, values, bias = store.restore(TENANT, session_id).tensors()
    finally:
        store.close()
    labels = {key: value for key, value in record.labels.items() if key != "source_created_ms"}  # a timestamp
    return record, keys, values, bias, labels


def assert_same_results(config_a, config_b, session_ids) -> None:
    for session_id in session_ids:
        (ra, ka, va, ba, la), (rb, kb, vb, bb, lb) = stored(config_a, session_id), stored(config_b, session_id)
        assert la == lb and ra.logical_length == rb.logical_length and ra.has_bias and rb.has_bias, session_id
        assert np.array_equal(ra.token_ids, rb.token_ids) and np.array_equal(ra.positions, rb.positions), session_id
        for layer in range(TOY_SPEC.num_layers):
            assert torch.equal(ka[layer], kb[layer]) and torch.equal(va[layer], vb[layer]) and torch.equal(ba[layer], bb[layer]), (session_id, layer)


def test_ray_workers_store_what_one_process_stores_and_a_rerun_skips_all(ray_cluster, namespaces, capsys):
    on_ray, alone = namespaces
    job = Job("knorm", ratio=0.25)
    assert ray_cli(on_ray, "--method", "knorm", "--ratio", "0.25", "--all") == 0
    out = capsys.readouterr().out
    assert "done: 8 compacted, 0 already done, 8 sessions" in out and "shared-3 -> shared-3@knorm-r0.25" in out
    compactor = single_process(alone, job, eight_sessions(), model="smollm2-135m-instruct")
    assert compactor._host is None  # knorm needs no reference queries: no model was made
    assert compactor.host("attention_matching")._loaded is None  # a method that does gets one, loaded on first use
    compactor.close()
    assert_same_results(on_ray, alone, [job.destination(s) for s in eight_sessions()])

    assert ray_cli(on_ray, "--method", "knorm", "--ratio", "0.25", "--all") == 0  # resumable: nothing left to do
    out = capsys.readouterr().out
    assert "done: 0 compacted, 8 already done, 8 sessions" in out and "own-0: already compacted as own-0@knorm-r0.25, skipped" in out


def test_a_failing_session_is_reported_and_the_others_finish(ray_cluster, namespaces, capsys):
    on_ray, alone = namespaces
    job = Job("streaming_llm", budget=20)  # shared-0 holds 16 tokens: too few for the budget
    sessions = [*eight_sessions(), "ghost"]  # ghost does not exist
    assert ray_cli(on_ray, "--method", "streaming_llm", "--budget", "20", "--sessions", *sessions) == 1
    out = capsys.readouterr().out
    assert "done: 7 compacted, 0 already done, 2 failed" in out
    assert "shared-0: FAILED: InvalidRequest: token budget 20 is larger than the session (16 tokens)" in out
    assert "ghost: FAILED: NotFound" in out
    single_process(alone, job, sessions).close()
    assert_same_results(on_ray, alone, [job.destination(s) for s in eight_sessions() if s != "shared-0"])


def test_through_a_kvmem_server_the_workers_call_compact(ray_cluster, service, client, capsys):
    for index in range(4):
        client.save(f"s{index}", random_layers(TOY_SPEC, 32, seed=index), list(range(32)))
    address = f"127.0.0.1:{service.port}"
    assert main(["compact", "--method", "knorm", "--ratio", "0.5", "--all", "--ray", "--address", address, "--address", address]) == 0
    assert "done: 4 compacted, 0 already done, 4 sessions" in capsys.readouterr().out
    assert {client.get(f"s{index}@knorm-r0.5").labels["compaction"] for index in range(4)} == {"knorm"}
