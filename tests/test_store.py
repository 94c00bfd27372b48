"""SessionStore behaviour on a real LMDB: dedup, refcounts, fork, append, TTL, limits, atomicity."""
import dataclasses

import numpy as np
import pytest
import torch

from kvstore.errors import AlreadyExists, CapacityExceeded, Conflict, InvalidRequest, ModelMismatch, NotFound
from kvstore.spec import ModelSpec
from kvstore.store import SessionStore, StoreConfig
from tests.conftest import TOY_SPEC, random_layers

WIDE_SPEC = dataclasses.replace(TOY_SPEC, max_position=1 << 16)  # TOY_SPEC's layout, for sessions past its 4096 window


def pieces_for(store, layers, start=0, spec=TOY_SPEC, bias=None):
    end = start + layers[0][0].shape[1]
    pieces = store.new_pieces(spec, start, end, has_bias=bias is not None)
    for layer, (k, v) in enumerate(layers):
        pieces.add_tensors(layer, start, k, v, None if bias is None else bias[layer])
    return pieces


def save(store, session_id, tokens, layers, spec=TOY_SPEC, **kwargs):
    return store.save("t", session_id, spec, np.asarray(tokens), pieces_for(store, layers, spec=spec), **kwargs)


def restored(store, session_id, start=0, end=0, spec=None):
    plan = store.restore("t", session_id, spec, start, end)
    count = plan.end - plan.start
    out = [[torch.empty(TOY_SPEC.num_kv_heads, count, TOY_SPEC.head_dim) for _ in range(2)] for _ in range(TOY_SPEC.num_layers)]
    for piece in plan.pieces():
        lo = piece.token_start - plan.start
        for index, data in enumerate((piece.keys, piece.values)):
            array = np.frombuffer(data, dtype=np.float32).reshape(TOY_SPEC.num_kv_heads, piece.num_tokens, TOY_SPEC.head_dim)
            out[piece.layer][index][:, lo : lo + piece.num_tokens] = torch.from_numpy(array.copy())
    return plan, out


def same(layers_a, layers_b, lo=0, hi=None):
    return all(torch.equal(a[0], b[0][:, lo:hi]) and torch.equal(a[1], b[1][:, lo:hi]) for a, b in zip(layers_a, layers_b))


def test_round_trip_ranges_and_unaligned_lengths(store):
    layers = random_layers(TOY_SPEC, 53)
    save(store, "s", range(53), layers)
    plan, out = restored(store, "s")
    assert plan.num_pieces == 4 * TOY_SPEC.num_layers and same(out, layers)
    keys, values, bias = store.restore("t", "s", start=7, end=50).tensors()
    assert bias is None and same([(k, v) for k, v in zip(keys, values)], layers, 7, 50)
    plan, out = restored(store, "s", 10, 40)  # crosses chunk boundaries on both ends
    assert list(plan.token_ids) == list(range(10, 40)) and same(out, layers, 10, 40)


def test_pieces_that_straddle_chunks_are_stored_bit_exactly(store):
    """Each layer's KV in irregular pieces (another cut per layer, crossing chunk boundaries,
    with biases): the save copies strided views of them straight into block records."""
    tokens = 70
    layers = random_layers(TOY_SPEC, tokens, seed=5)
    bias = [torch.randn(TOY_SPEC.num_kv_heads, tokens) for _ in range(TOY_SPEC.num_layers)]
    pieces = store.new_pieces(TOY_SPEC, 0, tokens, has_bias=True)
    for layer, (k, v) in enumerate(layers):
        cuts = [0, 3 + layer, 29 + 2 * layer, 45, tokens]
        for lo, hi in zip(cuts, cuts[1:]):
            pieces.add_tensors(layer, lo, k[:, lo:hi].clone(), v[:, lo:hi].clone(), bias[layer][:, lo:hi].clone())
    store.save("t", "cut", TOY_SPEC, np.arange(tokens), pieces)
    keys, values, got_bias = store.restore("t", "cut").tensors()
    assert all(torch.equal(keys[i], k) and torch.equal(values[i], v) for i, (k, v) in enumerate(layers))
    assert all(torch.equal(got_bias[i], bias[i]) for i in range(TOY_SPEC.num_layers))


def test_identical_prefix_is_stored_once_and_refcounted(store):
    shared = random_layers(TOY_SPEC, 64, seed=1)
    tail_a, tail_b = random_layers(TOY_SPEC, 20, seed=2), random_layers(TOY_SPEC, 20, seed=3)
    cat = lambda a, b: [(torch.cat([x[0], y[0]], 1), torch.cat([x[1], y[1]], 1)) for x, y in zip(a, b)]  # noqa: E731
    first = save(store, "a", list(range(64)) + [1] * 20, cat(shared, tail_a))
    one_session = store.stats()["stored_bytes"]
    second = save(store, "b", list(range(64)) + [2] * 20, cat(shared, tail_b))
    assert first.deduplicated_tokens == 0 and second.deduplicated_tokens == 64
    stats = store.stats()
    tail_bytes = one_session * 20 // 84
    assert stats["stored_bytes"] < one_session + tail_bytes * 1.2  # prefix not stored twice
    assert stats["logical_bytes"] == 2 * 84 * TOY_SPEC.bytes_per_token
    assert store.lookup("t", TOY_SPEC, np.array(list(range(64)) + [9] * 5)) == 64
    freed = store.delete("t", "a")
    assert 0 < freed < one_session  # only a's private tail is freed
    _, out = restored(store, "b")
    assert same(out, cat(shared, tail_b))
    store.delete("t", "b")
    assert store.stats()["stored_bytes"] == 0 and store.stats()["chunks"] == 0


def test_lookup_finds_partial_tail_and_respects_tenant_and_model(store):
    save(store, "s", range(40), random_layers(TOY_SPEC, 40))
    assert store.lookup("t", TOY_SPEC, np.arange(45)) == 40
    assert store.lookup("t", TOY_SPEC, np.arange(35)) == 32  # a shorter query matches full chunks
    assert store.lookup("other", TOY_SPEC, np.arange(40)) == 0
    assert store.lookup("t", ModelSpec("other", 4, 3, 8, max_position=4096), np.arange(40)) == 0
    plan = store.restore_prefix("t", TOY_SPEC, np.arange(45))
    assert plan.end == 40


def test_fork_shares_blocks_and_append_diverges(store):
    base = random_layers(TOY_SPEC, 40, seed=4)
    save(store, "root", range(40), base)
    before = store.stats()["stored_bytes"]
    fork = store.fork("t", "root", "child", 24)
    assert fork.shared_tokens == 16 and fork.copied_tokens == 8
    assert store.stats()["stored_bytes"] - before < before / 2  # only the 8-token boundary chunk was copied
    extra = random_layers(TOY_SPEC, 10, seed=5)
    store.append("t", "child", TOY_SPEC, np.full(10, 7), pieces_for(store, extra, start=24))
    _, child = restored(store, "child")
    _, root = restored(store, "root")
    assert same(root, base)  # the source is untouched
    assert same([(k[:, :24], v[:, :24]) for k, v in base], child, 0, 24) and same(extra, child, 24, 34)
    info = store.get("t", "child")
    assert info.num_tokens == 34 and info.parent_session_id == "root" and info.version == 2
    assert store.lookup("t", TOY_SPEC, np.concatenate([np.arange(24), np.full(10, 7)])) == 34


def test_append_checks_expected_length_model_and_coverage(store):
    save(store, "s", range(20), random_layers(TOY_SPEC, 20))
    extra = random_layers(TOY_SPEC, 4)
    with pytest.raises(Conflict):
        store.append("t", "s", TOY_SPEC, np.arange(4), pieces_for(store, extra, 20), expected_num_tokens=19)
    with pytest.raises(ModelMismatch, match="num_layers"):
        store.append("t", "s", ModelSpec("toy-model", 5, 3, 8, max_position=4096), np.arange(4), pieces_for(store, extra, 20))
    partial = store.new_pieces(TOY_SPEC, 20, 24)
    partial.add_tensors(0, 20, *extra[0])
    with pytest.raises(InvalidRequest, match="layer 1"):
        store.append("t", "s", TOY_SPEC, np.arange(4), partial)
    assert store.get("t", "s").num_tokens == 20


def test_save_refuses_duplicates_unless_overwrite(store):
    save(store, "s", range(20), random_layers(TOY_SPEC, 20, seed=1))
    with pytest.raises(AlreadyExists):
        save(store, "s", range(20), random_layers(TOY_SPEC, 20, seed=2))
    replacement = random_layers(TOY_SPEC, 30, seed=3)
    save(store, "s", [5] * 30, replacement, overwrite=True)
    _, out = restored(store, "s")
    assert same(out, replacement) and store.stats()["sessions"] == 1


def test_restore_into_another_spec_names_the_difference(store):
    save(store, "s", range(20), random_layers(TOY_SPEC, 20))
    other = ModelSpec("toy-model", 4, 3, 8, "float16", max_position=4096)
    with pytest.raises(ModelMismatch, match="dtype"):
        store.restore("t", "s", other)


def test_ttl_expiry_hides_then_collects(tmp_path):
    clock = [1000.0]
    store = SessionStore.open(StoreConfig(data_dir=tmp_path, chunk_tokens=16, lmdb_map_bytes=8 << 20), clock=lambda: clock[0])
    save(store, "short", range(20), random_layers(TOY_SPEC, 20), ttl_seconds=10)
    save(store, "forever", range(100, 120), random_layers(TOY_SPEC, 20))
    clock[0] += 9
    assert store.get("t", "short").expires_at_ms == 1_010_000
    clock[0] += 2
    with pytest.raises(NotFound):
        store.get("t", "short")  # expired sessions are invisible before collection
    assert store.collect_expired() == 1
    assert [r.session_id for r in store.list("t")[0]] == ["forever"]
    assert store.stats()["sessions"] == 1 and store.collect_expired() == 0
    store.close()


def test_list_pages_through_every_session(store):
    for index in range(7):
        save(store, f"s{index}", [index] * 5, random_layers(TOY_SPEC, 5, seed=index))
    seen, token = [], ""
    while True:
        page, token = store.list("t", page_size=3, page_token=token)
        seen += [r.session_id for r in page]
        if not token:
            break
    assert seen == [f"s{i}" for i in range(7)]
    assert store.list("other")[0] == []
    with pytest.raises(InvalidRequest):
        store.list("t", page_token="!!not-a-token")


@pytest.mark.parametrize("bad_id", ["", "x" * 257, "a\nb", "nul\x00"])
def test_bad_session_ids_are_rejected(store, bad_id):
    with pytest.raises(InvalidRequest):
        save(store, bad_id, range(5), random_layers(TOY_SPEC, 5))
    assert store.stats()["sessions"] == 0


def test_lmdb_ceiling_is_resource_exhausted_and_earlier_sessions_survive(tmp_path):
    config = StoreConfig(data_dir=tmp_path, chunk_tokens=64, cpu_tier_bytes=0, lmdb_map_bytes=1 << 20, lmdb_max_map_bytes=4 << 20)
    store = SessionStore.open(config)
    first = random_layers(TOY_SPEC, 1500, seed=1)  # ~1.15 MB: forces growth past the 1 MiB start
    save(store, "first", range(1500), first)
    assert store.backend.map_bytes > 1 << 20  # grew
    with pytest.raises(CapacityExceeded, match="ceiling"):
        save(store, "huge", range(1000, 6000), random_layers(TOY_SPEC, 5000, seed=2), spec=WIDE_SPEC)  # ~3.8 MB more
    assert store.stats()["sessions"] == 1
    with pytest.raises(NotFound):
        store.get("t", "huge")
    _, out = restored(store, "first")
    assert same(out, first)
    store.close()


def test_compacted_session_with_positions_and_bias_round_trips(store):
    layers = random_layers(TOY_SPEC, 12)
    bias = [torch.randn(TOY_SPEC.num_kv_heads, 12) for _ in range(TOY_SPEC.num_layers)]
    positions = np.array([0, 1, 2, 3, 10, 20, 30, 40, 50, 97, 98, 99])
    result = store.save("t", "c", TOY_SPEC, np.arange(12), pieces_for(store, layers, bias=bias), positions=positions, logical_length=100)
    assert result.record.has_bias and not result.record.chained and result.record.logical_length == 100
    plan = store.restore("t", "c")
    assert list(plan.positions) == positions.tolist()
    got = {piece.layer: np.frombuffer(piece.bias, dtype=np.float32) for piece in plan.pieces()}
    assert all(np.array_equal(got[layer].reshape(3, 12), bias[layer].numpy()) for layer in range(4))
    assert store.lookup("t", TOY_SPEC, np.arange(12)) == 0  # compacted blocks are private, never matched as prefixes


def test_data_survives_reopen(tmp_path):
    config = StoreConfig(data_dir=tmp_path, chunk_tokens=16, lmdb_map_bytes=8 << 20)
    layers = random_layers(TOY_SPEC, 40)
    store = SessionStore.open(config)
    save(store, "s", range(40), layers)
    store.close()
    reopened = SessionStore.open(config)
    _, out = restored(reopened, "s")
    assert same(out, layers) and reopened.blocks.lmdb_counters.hits > 0
    reopened.close()


def test_disk_full_is_capacity_exceeded_and_the_store_keeps_working(tmp_path):
    """A real full filesystem: a 3 MiB tmpfs (needs root to mount, as on the project machines)."""
    import subprocess

    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the LMDB-ceiling test covers the same path")
    try:
        config = StoreConfig(data_dir=mount_point, chunk_tokens=64, cpu_tier_bytes=0, lmdb_map_bytes=64 << 20, lmdb_max_map_bytes=256 << 20,
                             max_session_bytes=64 << 20)  # past the disk: the write itself must fail
        store = SessionStore.open(config)
        first = random_layers(TOY_SPEC, 1000, seed=1)  # ~0.8 MB
        save(store, "first", range(1000), first)
        with pytest.raises(CapacityExceeded, match="full"):
            save(store, "big", range(5000, 10000), random_layers(TOY_SPEC, 5000, seed=2), spec=WIDE_SPEC)  # ~3.8 MB
        assert store.stats()["sessions"] == 1
        _, out = restored(store, "first")
        assert same(out, first)
        small = random_layers(TOY_SPEC, 50, seed=3)
        save(store, "small", range(20000, 20050), small)  # still accepts what fits
        _, out = restored(store, "small")
        assert same(out, small)
        store.close()
        reopened = SessionStore.open(config)
        assert sorted(r.session_id for r in reopened.list("t")[0]) == ["first", "small"]
        reopened.close()
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
