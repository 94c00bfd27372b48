"""Memory tiers and the tiered block store: LRU bounds, promotion on hit, demotion on pressure."""
import numpy as np
import pytest
import torch

from kvstore.codec import encode_block
from kvstore.tiers import MemoryTier
from kvstore.tiered import TieredBlockStore
from kvstore.store import SessionStore, StoreConfig
from tests.conftest import TOY_SPEC, random_layers


def _block(index: int, size: int = 1000):
    payload = bytes([index % 256]) * size
    return encode_block(index.to_bytes(18, "big"), 0, (1, size // 4, 1), 1, payload, payload)


def test_lru_tier_stays_within_capacity_and_evicts_least_recent():
    tier = MemoryTier("cpu", capacity_bytes=3 * _block(0).nbytes)
    blocks = [_block(i) for i in range(4)]
    for block in blocks[:3]:
        assert tier.put(block) == []
    assert tier.get(blocks[0].key) is not None  # 0 is now most recent; 1 is the LRU
    evicted = tier.put(blocks[3])
    assert [b.key for b in evicted] == [blocks[1].key]
    assert tier.bytes_used() <= tier.capacity() and len(tier) == 3
    assert tier.counters.evictions == 1 and tier.counters.hits == 1


def test_block_larger_than_tier_is_not_kept():
    tier = MemoryTier("cpu", capacity_bytes=100)
    assert len(tier.put(_block(1))) == 1 and len(tier) == 0


def _save(store, session_id, tokens, seed):
    layers = random_layers(TOY_SPEC, len(tokens), seed)
    pieces = store.new_pieces(TOY_SPEC, 0, len(tokens))
    for layer, (k, v) in enumerate(layers):
        pieces.add_tensors(layer, 0, k, v)
    store.save("t", session_id, TOY_SPEC, np.asarray(tokens), pieces)
    return layers


def _restored(store, session_id):
    plan = store.restore("t", session_id)
    out = [torch.empty(TOY_SPEC.num_kv_heads, plan.end, TOY_SPEC.head_dim) for _ in range(TOY_SPEC.num_layers)]
    for piece in plan.pieces():
        values = np.frombuffer(piece.keys, dtype=np.float32).reshape(TOY_SPEC.num_kv_heads, piece.num_tokens, TOY_SPEC.head_dim)
        out[piece.layer][:, piece.token_start : piece.token_start + piece.num_tokens] = torch.from_numpy(values.copy())
    return out


def test_small_cpu_budget_demotes_without_losing_data_and_promotes_on_hit(tmp_path):
    # a block (16 tokens, one layer) is ~3.1 KB, a 48-token session ~37 KB: the tier holds one session
    config = StoreConfig(data_dir=tmp_path, chunk_tokens=16, cpu_tier_bytes=40_000, lmdb_map_bytes=8 << 20)
    store = SessionStore.open(config)
    saved = {f"s{i}": _save(store, f"s{i}", [i * 1000 + j for j in range(48)], seed=i) for i in range(4)}
    cpu = store.blocks.tiers[0]
    assert cpu.bytes_used() == 0  # saves stream to the backend; the memory tier holds what restores read
    lmdb_hits = store.blocks.lmdb_counters.hits
    for session_id, layers in saved.items():  # everything restores bit-exactly, from LMDB where evicted
        assert all(torch.equal(a, k) for a, (k, _) in zip(_restored(store, session_id), layers))
    assert store.blocks.lmdb_counters.hits > lmdb_hits
    assert 0 < cpu.bytes_used() <= 40_000 and cpu.counters.evictions > 0  # pressure pushed blocks out
    promotions = cpu.counters.promotions
    assert promotions > 0  # LMDB hits were promoted into the CPU tier
    hits = cpu.counters.hits
    _restored(store, "s3")  # s3 was restored last, so all of it is resident
    assert cpu.counters.hits == hits + 12  # 3 chunks x 4 layers, all CPU hits
    store.close()


def test_two_tier_chain_demotes_to_the_slower_tier(tmp_path):
    """A [fast, slow] memory tier chain (the GPU/CPU arrangement, here both on CPU)."""
    from kvstore.lmdb_backend import LmdbBackend, LmdbConfig

    backend = LmdbBackend(LmdbConfig(tmp_path / "l", 1 << 20))
    fast, slow = MemoryTier("fast", 2 * _block(0).nbytes), MemoryTier("slow", 10 * _block(0).nbytes)
    tiers = TieredBlockStore(backend, [fast, slow])
    blocks = [_block(i) for i in range(3)]
    for block in blocks:
        tiers._place(0, block)
    assert len(fast) == 2 and slow.contains(blocks[0].key)  # the LRU victim moved down, not dropped
    assert tiers._get_from_memory(blocks[0].key) is not None
    assert fast.contains(blocks[0].key) and fast.counters.promotions == 1  # promoted back up on hit
    backend.close()
