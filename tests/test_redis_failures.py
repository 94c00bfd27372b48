"""Process death over the shared Redis backend: a kvmem server SIGKILLed during concurrent saves
(every acknowledged save restores through another server), and a Redis master SIGKILLed during
concurrent saves with ``redis_min_replicas=1`` (its replica takes over, nothing acknowledged is
lost, writes resume once the shard has a replica again)."""
import itertools
import subprocess
import threading
import time

import pytest
import torch
from redis.crc import key_slot

from kvmem.client import Client
from kvmem.local_cluster import LocalRedisCluster
from kvstore import errors
from tests.conftest import TOY_SPEC, random_layers
from tests.test_durability import _kill_during_saves, _small_tokens, same

pytestmark = pytest.mark.slow  # server processes, a Redis Cluster of its own, kills and failovers

_names = itertools.count()


def _redis_flags(url: str, namespace: str, *extra: str) -> list[str]:
    return ["--set", "store.backend=redis", "--set", f"store.redis_url={url}", "--set", f"store.redis_namespace={namespace}",
            "--set", "store.redis_min_replicas=1", "--set", "store.chunk_tokens=64", *extra]


def _seed_of(session_id: str) -> int:
    worker, index = session_id[1:].split("-")
    return int(worker) * 10_000 + int(index)


def _check_whole(client: Client, acknowledged: dict[str, int], tokens_of) -> set[str]:
    """Every acknowledged save is listed and restores bit-exactly; every listed session (acknowledged
    or not: a save whose reply was lost may have committed) is whole. Returns the listed ids."""
    listed = {info.session_id: info for info in client.list()}
    missing = set(acknowledged) - set(listed)
    assert not missing, f"acknowledged saves lost: {sorted(missing)[:5]}"
    for session_id, info in listed.items():
        seed = _seed_of(session_id)
        assert info.num_tokens == tokens_of(seed), session_id
        assert same(client.restore(session_id).layers, random_layers(TOY_SPEC, tokens_of(seed), seed=seed)), session_id
    return set(listed)


def test_sigkill_of_one_server_loses_no_acknowledged_save_and_another_serves_them(server_process, redis_cluster, tmp_path):
    namespace = f"kill-server-{next(_names)}-{time.monotonic_ns()}"
    flags = _redis_flags(redis_cluster.url, namespace)
    server_a = server_process(tmp_path / "a", *flags)
    server_b = server_process(tmp_path / "b", *flags)
    acknowledged = _kill_during_saves(server_a, _small_tokens, 12)  # 4 writers through A, SIGKILL of A mid-save
    with Client(server_b.address, spec=TOY_SPEC) as client:
        listed = _check_whole(client, acknowledged, _small_tokens)
        assert client.stats().sessions == len(listed)
        # B keeps serving writes after A's death (token ids no writer used: equal ids would share KV)
        layers = random_layers(TOY_SPEC, 200, seed=5)
        client.save("after", layers, list(range(4_000_000_000, 4_000_000_200)))
        assert same(client.restore("after").layers, layers)


class _Writers:
    """4 threads saving distinct sessions through one server until stopped; a failed save (the
    server answered UNAVAILABLE during the failover, say) is counted and the writer goes on."""

    def __init__(self, address: str, tokens_of, count: int = 4):
        self.address, self.tokens_of = address, tokens_of
        self.acknowledged: dict[str, int] = {}
        self.failures: list[str] = []
        self.acknowledged_at: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(worker,), daemon=True) for worker in range(count)]

    def __enter__(self) -> "_Writers":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _run(self, worker: int) -> None:
        with Client(self.address, spec=TOY_SPEC, timeout=60) as client:
            for index in itertools.count():
                if self._stop.is_set():
                    return
                session_id, seed = f"w{worker}-{index}", worker * 10_000 + index
                tokens = self.tokens_of(seed)
                try:
                    client.save(session_id, random_layers(TOY_SPEC, tokens, seed=seed), list(range(seed * 10_000, seed * 10_000 + tokens)), reuse_prefix=False)
                except errors.KvmemError as exc:
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                    time.sleep(0.1)
                    continue
                with self._lock:
                    self.acknowledged[session_id] = seed
                    self.acknowledged_at.append(time.monotonic())

    def wait_for(self, count: int, after: float = 0.0, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for at in list(self.acknowledged_at) if at > after) < count:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged)} saves acknowledged; failures: {self.failures[-3:]}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    """A 3+3 cluster for the tests that kill its nodes (each leaves it healthy, roles changed)."""
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("killable-cluster")).start()
    yield cluster
    cluster.stop(remove=True)


def test_sigkill_of_a_redis_master_with_min_replicas_loses_no_acknowledged_save_and_writes_resume(server_process, own_cluster, tmp_path):
    cluster = own_cluster
    namespace = f"kill-master-{next(_names)}"
    server = server_process(tmp_path / "s", *_redis_flags(cluster.url, namespace, "--set", "store.redis_timeout_seconds=2",
                                                         "--set", "store.redis_failover_seconds=20"))
    # the master of the metadata slot: every commit goes through it, and blocks land there too
    meta_slot = key_slot(f"{{{namespace}}}:v:sessions".encode())
    victim = cluster.primary_of_slot(meta_slot)
    with _Writers(server.address, _small_tokens) as writers:
        writers.wait_for(8)
        before_kill = dict(writers.acknowledged)
        cluster.kill(victim)  # SIGKILL: no shutdown, no final fsync
        promoted = cluster.wait_failover(meta_slot, victim)  # its replica is promoted
        # the promoted master has no replica yet: writes that need one fail (UNAVAILABLE, never a
        # silent loss) until the old master rejoins, as a replica of its successor
        time.sleep(3)
        cluster.start_node(victim)
        cluster.wait_healthy(timeout_s=60)
        cluster.wait_replicas_synced()
        rejoined = time.monotonic()
        writers.wait_for(8, after=rejoined)  # writes resume
    assert cluster.role(victim) == "slave" and cluster.role(promoted) == "master"
    assert set(before_kill) <= set(writers.acknowledged)
    with Client(server.address, spec=TOY_SPEC) as client:
        _check_whole(client, writers.acknowledged, _small_tokens)
    # whatever failed, failed with a status a client can act on (retry), never INTERNAL
    assert all(failure.startswith("Unavailable:") for failure in writers.failures), writers.failures[:5]


def test_a_failover_between_block_writes_and_the_commit_fails_the_save_instead_of_committing_lost_blocks(own_cluster, tmp_path):
    """Blocks are written without a WAIT each; the commit first waits for their replicas. If the
    primary that took them is gone (failed over) by then, the blocks may be lost with it: the save
    is UNAVAILABLE (outcome unknown), nothing is committed, and the same save succeeds again."""
    import numpy as np

    from kvstore.store import SessionStore, StoreConfig
    from tests.test_store import pieces_for

    cluster = own_cluster
    store = SessionStore.open(StoreConfig(data_dir=tmp_path / "d", chunk_tokens=16, backend="redis", redis_url=cluster.url,
                                          redis_namespace=f"barrier-{next(_names)}", redis_min_replicas=1, redis_timeout_seconds=5,
                                          redis_failover_seconds=20))
    try:
        layers = random_layers(TOY_SPEC, 160, seed=9)
        pieces = pieces_for(store, layers)
        write = store.begin_save("t", "s", TOY_SPEC, np.arange(160), has_bias=False)
        for layer, (k, v) in enumerate(layers):
            write.add(layer, 0, 160, pieces.dtype_code, k.numpy().tobytes(), v.numpy().tobytes())
        write.staged.flush()
        write.staged._wait_flushed()  # the blocks are on their primaries, not yet confirmed on replicas
        assert write.staged.receipts, "the flush wrote no blocks"
        victim = next(iter(write.staged.receipts))[1]
        nodes = store.backend.nodes
        slot = next(key_slot(name) for name in map(store.backend.block_key, store.backend._all_block_keys()) if nodes.primary(name)[1] == victim)
        cluster.kill(victim)
        cluster.wait_failover(slot, victim)
        with pytest.raises(errors.Unavailable, match="outcome is unknown"):
            write.commit()
        with pytest.raises(errors.NotFound):
            store.get("t", "s")
        cluster.start_node(victim)  # back as a replica: the promoted primary can meet min_replicas again
        cluster.wait_healthy(timeout_s=60)
        cluster.wait_replicas_synced()  # it acknowledges nothing while it loads its new master's data
        store.save("t", "s", TOY_SPEC, np.arange(160), pieces_for(store, layers))
        keys, values, _ = store.restore("t", "s").tensors()
        assert all(torch.equal(k, a) and torch.equal(v, b) for k, v, (a, b) in zip(keys, values, layers))
    finally:
        store.close()



def test_redis_out_of_memory_is_capacity_exceeded_and_keeps_what_was_stored(tmp_path):
    """A Redis at maxmemory (noeviction) refuses writes: RESOURCE_EXHAUSTED with what to do,
    never INTERNAL, and the sessions stored before restore bit-exactly."""
    import numpy as np
    import redis

    from kvmem.local_cluster import find_base_port
    from kvstore.store import SessionStore, StoreConfig
    from tests.test_store import pieces_for

    port = find_base_port(1, start=7900)
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--maxmemory", "4mb", "--maxmemory-policy", "noeviction", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        store = SessionStore.open(StoreConfig(data_dir=tmp_path / "d", chunk_tokens=64, backend="redis", redis_url=f"redis://127.0.0.1:{port}"))
        try:
            small = random_layers(TOY_SPEC, 64, seed=1)
            store.save("t", "small", TOY_SPEC, np.arange(64), pieces_for(store, small))
            big = random_layers(TOY_SPEC, 40_000, seed=2)  # about 20 MB: past maxmemory
            with pytest.raises(errors.CapacityExceeded, match="out of memory"):
                store.save("t", "big", TOY_SPEC, np.arange(10**6, 10**6 + 40_000), pieces_for(store, big))
            keys, values, _ = store.restore("t", "small").tensors()
            assert all(torch.equal(k, a) and torch.equal(v, b) for k, v, (a, b) in zip(keys, values, small))
            with pytest.raises(errors.NotFound):
                store.get("t", "big")
            backend_tier = store.stats()["tiers"][-1]
            assert backend_tier["name"] == "redis" and backend_tier["capacity_bytes"] == 4 << 20  # maxmemory, not an LMDB setting
        finally:
            store.close()
    finally:
        process.kill()
        process.wait(10)


def test_cluster_redirections_are_retried_not_raised():
    """redis-py strips the code from the replies it maps to classes (MovedError("3999 host:port")):
    a redirection after a failover must still read as retryable (it once surfaced as INTERNAL)."""
    import redis

    from kvstore.redis_nodes import as_kvmem_error, is_retryable

    assert is_retryable(redis.exceptions.MovedError("3999 127.0.0.1:7002"))
    assert is_retryable(redis.exceptions.AskError("3999 127.0.0.1:7002"))
    assert is_retryable(redis.exceptions.ClusterDownError("The cluster is down"))
    assert is_retryable(redis.exceptions.ReadOnlyError("You can't write against a read only replica."))
    assert is_retryable(redis.ResponseError("NOREPLICAS Not enough good replicas to write."))
    assert is_retryable(redis.ConnectionError("Connection refused"))
    assert not is_retryable(redis.exceptions.AuthenticationError("invalid username-password pair"))
    assert not is_retryable(redis.ResponseError("ERR wrong number of arguments"))
    assert isinstance(as_kvmem_error(redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "x"), errors.CapacityExceeded)
    assert isinstance(as_kvmem_error(redis.exceptions.AuthenticationError("invalid password"), "x"), errors.Unavailable)
