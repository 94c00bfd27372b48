"""The store over the Redis backend on a real 3+3 Redis Cluster: two stores (two servers) sharing
it, damaged values, and the block sweep against committed sessions."""
import itertools
import threading

import numpy as np
import pytest
import torch

from kvstore.errors import CorruptData, NotFound
from kvstore.store import SessionStore, StoreConfig
from tests.conftest import TOY_SPEC, random_layers
from tests.test_store import pieces_for, restored, same, save

_names = itertools.count()


@pytest.fixture
def shared(redis_cluster, tmp_path):
    """Two SessionStores (as two servers would hold) over one namespace of the cluster."""
    namespace = f"store-{next(_names)}-{abs(hash(str(tmp_path))):x}"
    config = StoreConfig(data_dir=tmp_path / "data", chunk_tokens=16, cpu_tier_bytes=8 << 20, backend="redis",
                         redis_url=redis_cluster.url, redis_namespace=namespace, redis_min_replicas=1)
    a, b = SessionStore.open(config), SessionStore.open(config)
    yield a, b
    a.close()
    b.close()


def test_save_on_one_restore_on_the_other_append_visible_and_prefix_deduplicated(shared):
    a, b = shared
    layers = random_layers(TOY_SPEC, 40, seed=1)
    save(a, "s", np.arange(40), layers)
    assert same(restored(b, "s")[1], layers)
    extra = random_layers(TOY_SPEC, 8, seed=2)
    b.append("t", "s", TOY_SPEC, np.full(8, 7), pieces_for(b, extra, start=40))
    after = restored(a, "s")[1]
    assert after[0][0].shape[1] == 48 and same(layers, after, 0, 40) and torch.equal(after[0][0][:, 40:], extra[0][0])
    stored_before = a.usage("t").stored_bytes
    save(b, "copy", np.arange(40), layers)  # the same 40 tokens: two whole 16-token chunks are shared
    assert b.usage("t").stored_bytes - stored_before < stored_before / 2
    assert a.usage("t").sessions == 2


def test_a_flipped_byte_in_a_stored_block_is_data_loss_never_data(shared, redis_cluster):
    a, b = shared
    save(a, "s", np.arange(32), random_layers(TOY_SPEC, 32, seed=3))
    backend = a.backend
    keys = sorted(backend._all_block_keys())
    assert keys, "the save stored no blocks"
    name = backend.block_key(keys[0])
    node = backend.nodes.client(backend.nodes.primary(name))
    value = bytearray(node.get(name))
    value[len(value) // 2] ^= 0x10
    node.set(name, bytes(value))
    for tier in b.blocks.tiers:
        tier.delete(keys[0])
    with pytest.raises(CorruptData):
        restored(b, "s")


def test_the_sweep_never_deletes_a_block_a_committed_session_references(shared):
    a, b = shared
    layers = random_layers(TOY_SPEC, 48, seed=4)
    save(a, "keep", np.arange(48), layers)
    save(a, "drop", np.arange(48), layers)  # the same chunks, one more reference
    errors = []

    def writer(index):
        try:
            for step in range(4):
                save(b, f"w{index}-{step}", np.arange(48), layers)  # reuses the prefix while the sweep runs
                b.delete("t", f"w{index}-{step}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    a.delete("t", "drop")
    swept = 0
    while any(thread.is_alive() for thread in threads):
        swept += a.backend.sweep_blocks(grace_s=0)
    for thread in threads:
        thread.join()
    swept += a.backend.sweep_blocks(grace_s=0)
    assert errors == []
    assert same(restored(b, "keep")[1], layers)
    a.delete("t", "keep")
    a.backend.sweep_blocks(grace_s=0)
    assert a.backend._all_block_keys() == set()  # with every session gone, every block went
    with pytest.raises(NotFound):
        a.restore("t", "keep")
