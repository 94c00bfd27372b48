"""Indexes kept beside sessions (aux records), their persistence and rebuilds, and the Retrieve and
SearchText RPCs on a real server with the real model."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from kvmem.client import Client
from kvstore import errors
from kvstore.spec import ModelSpec
from kvstore.store import SessionStore, aux_key, session_key
from retrieval.block_index import BlockIndex, BlockIndexConfig
from retrieval.rope import Rope
from retrieval.service import TEXT_INDEX, _layer_name, block_index, block_index_stored, build_block_index, index_config_from
from tests.conftest import TOY_SPEC, random_layers

FACT = "The secret code for falcon is 4821937."


# ---------------------------------------------------------------------------- aux records
def _pieces(store, spec, layers, start, end):
    """KVPieces for session tokens [start, end) from per-layer (keys, values) [H, end - start, D]."""
    pieces = store.new_pieces(spec, start, end)
    for layer, (k, v) in enumerate(layers):
        raw = [memoryview(x.contiguous().numpy()).cast("B") for x in (k, v)]
        pieces.add(layer, start, end - start, 1, raw[0], raw[1], None)
    return pieces


def _flip_aux_byte(store, key: bytes, offset: int, mask: int) -> None:
    """Damage one byte of a stored aux record in place (as a disk fault would)."""

    def flip(txn):
        raw = bytearray(txn.get("aux", key))
        raw[offset] ^= mask
        txn.put("aux", key, bytes(raw))

    store.backend.write(flip)


def _toy_session(store, session_id="s", tokens=40, text=None, overwrite=False):
    pieces = _pieces(store, TOY_SPEC, random_layers(TOY_SPEC, tokens), 0, tokens)
    return store.save("t", session_id, TOY_SPEC, np.arange(tokens), pieces, text=text, overwrite=overwrite).record


def test_aux_records_are_tagged_with_their_session_generation(store):
    record = _toy_session(store, text="hello")
    store.put_aux("t", "s", {"index/x": b"payload"}, record)
    aux = store.get_aux("t", "s", "index/x")
    assert aux.payload == b"payload" and aux.matches(record)
    assert store.session_text("t", "s") == "hello"
    newer = _toy_session(store, overwrite=True)  # a replaced session loses its text and indexes
    assert store.get_aux("t", "s", "index/x") is None and store.session_text("t", "s") is None
    with pytest.raises(errors.Conflict):
        store.put_aux("t", "s", {"index/x": b"old"}, record)  # built from the old generation
    store.put_aux("t", "s", {"index/x": b"new"}, newer)
    store.delete("t", "s")
    with store.backend.read() as txn:
        assert txn.get("aux", aux_key(session_key("t", "s"), "index/x")) is None


def test_text_follows_appends_and_forks(store):
    _toy_session(store, text="first turn. ")
    pieces = _pieces(store, TOY_SPEC, random_layers(TOY_SPEC, 10), 40, 50)
    store.append("t", "s", TOY_SPEC, np.arange(10), pieces, text="second turn.")
    assert store.session_text("t", "s") == "first turn. second turn."
    store.fork("t", "s", "whole")
    store.fork("t", "s", "part", at_token=20)
    assert store.session_text("t", "whole") == "first turn. second turn."
    assert store.session_text("t", "part") is None  # text cannot be cut at a token offset


def test_damaged_aux_record_is_detected(store):
    record = _toy_session(store)
    store.put_aux("t", "s", {"index/x": b"payload" * 10}, record)
    _flip_aux_byte(store, aux_key(session_key("t", "s"), "index/x"), -3, 0x40)
    with pytest.raises(errors.CorruptData):
        store.get_aux("t", "s", "index/x")


# ---------------------------------------------------------------------------- block index persistence
@pytest.fixture(scope="module")
def real_session(smollm2, long_text):
    model, tokenizer = smollm2
    ids = tokenizer(long_text, return_tensors="pt").input_ids[:, :700]
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    return ids, cache


def _save_real(store, model, ids, cache, session_id="doc"):
    from kvmem.hf_cache import cache_to_layers

    total = ids.shape[1]
    pieces = _pieces(store, ModelSpec.from_model(model), cache_to_layers(cache), 0, total)
    return store.save("t", session_id, ModelSpec.from_model(model), ids[0].numpy(), pieces).record


def test_an_index_built_layer_by_layer_from_the_store_equals_one_built_in_memory(store):
    layers = random_layers(TOY_SPEC, 200, seed=5)
    pieces = _pieces(store, TOY_SPEC, layers, 0, 200)
    store.save("t", "s", TOY_SPEC, np.arange(200), pieces)
    rope = Rope(1.0 / (10000.0 ** (torch.arange(0, TOY_SPEC.head_dim, 2, dtype=torch.float32) / TOY_SPEC.head_dim)))
    config = BlockIndexConfig(block_tokens=32, representatives=2)
    tier = store.blocks.tiers[0]
    tier.clear()
    before = tier.bytes_used()
    _, streamed = build_block_index(store, rope, "t", "s", config)  # reads one layer at a time
    assert tier.bytes_used() == before  # a whole-session scan leaves the memory tier to the blocks requests use
    in_memory = BlockIndex.build([k for k, _ in layers], torch.arange(200), rope, config)
    assert [streamed.layer_to_bytes(l) for l in range(TOY_SPEC.num_layers)] == [in_memory.layer_to_bytes(l) for l in range(TOY_SPEC.num_layers)]


@pytest.mark.slow
def test_block_index_is_stored_reloaded_and_rebuilt(store_config, smollm2, real_session):
    model, _ = smollm2
    ids, cache = real_session
    rope, config = Rope.from_model(model), BlockIndexConfig(block_tokens=32)
    probe = torch.randn(3, 64)
    store = SessionStore.open(store_config)
    try:
        _save_real(store, model, ids, cache)
        first = block_index(store, rope, "t", "doc", config)
        assert first.rebuilt and first.reason == "missing"
        expected = [first.index.search(layer, probe, 5) for layer in range(30)]
        again = block_index(store, rope, "t", "doc", config)
        assert not again.rebuilt
    finally:
        store.close()
    store = SessionStore.open(store_config)  # a restart: the index comes back from LMDB
    try:
        reopened = block_index(store, rope, "t", "doc", config)
        assert not reopened.rebuilt
        for layer in range(30):
            got = reopened.index.search(layer, probe, 5)
            assert np.array_equal(got[0], expected[layer][0]) and np.allclose(got[1], expected[layer][1])
        store.delete_aux("t", "doc", _layer_name(config, 7))  # a lost record: rebuilt, same answers
        rebuilt = block_index(store, rope, "t", "doc", config)
        assert rebuilt.rebuilt and np.array_equal(rebuilt.index.search(7, probe, 5)[0], expected[7][0])
        key = aux_key(session_key("t", "doc"), _layer_name(config, 3))
        with store.backend.read() as txn:
            middle = len(txn.get("aux", key)) // 2
        _flip_aux_byte(store, key, middle, 0xFF)  # a damaged record: detected, rebuilt, never searched
        repaired = block_index(store, rope, "t", "doc", config)
        assert repaired.rebuilt and repaired.reason.startswith("corrupt")
        assert np.array_equal(repaired.index.search(3, probe, 5)[0], expected[3][0])
        assert not block_index(store, rope, "t", "doc", config).rebuilt
    finally:
        store.close()


# ---------------------------------------------------------------------------- RPCs
@pytest.fixture
def real_client(service, smollm2, real_session, long_text):
    model, _ = smollm2
    ids, cache = real_session
    with Client(f"127.0.0.1:{service.port}", spec=ModelSpec.from_model(model)) as client:
        text = long_text[:6000] + "\n" + FACT + "\n" + long_text[6000:12000]
        client.save("doc", cache, ids, text=text)
        yield client


@pytest.mark.slow
def test_retrieve_returns_blocks_per_layer_within_budget(real_client, real_session):
    ids, cache = real_session
    result = real_client.retrieve("doc", 256, text="What does the license say about patents?", include_kv=True)
    header = result.header
    assert header.index_rebuilt and header.block_tokens == 64 and header.sink_end == 4
    assert len(result.layers) == 30
    per_layer = [layer.num_tokens for layer in result.layers]
    assert abs(np.mean(per_layer) - 256) <= 64
    for layer in result.layers:
        assert list(layer.scores) == sorted(layer.scores, reverse=True)
        for start, length in zip(layer.block_starts, layer.block_lengths):
            assert header.sink_end <= start and start + length <= header.recent_start
    # the KV that comes back is the stored KV of exactly the selected tokens
    for layer in (0, 17):
        kept = sum(k.shape[1] for _, k, _ in result.kv[layer])
        assert kept == result.layers[layer].num_tokens
        for start, keys, values in result.kv[layer]:
            assert torch.equal(keys, cache.layers[layer].keys[0, :, start : start + keys.shape[1]])
            assert torch.equal(values, cache.layers[layer].values[0, :, start : start + values.shape[1]])
    again = real_client.retrieve("doc", 256, text="What does the license say about patents?")
    assert not again.header.index_rebuilt
    assert [list(l.block_starts) for l in again.layers] == [list(l.block_starts) for l in result.layers]
    by_ids = real_client.retrieve("doc", 256, token_ids=[1, 2, 3], method="last", dynamic_budget=False)
    assert len({layer.num_tokens for layer in by_ids.layers}) == 1


@pytest.mark.slow
def test_retrieve_reads_what_it_returns_and_keeps_the_index_in_memory(real_client, service):
    cache = service.frontend.servicer.index_cache
    doc = real_client.get("doc")
    record = service.store.get("default", "doc")

    def chunk_bytes(tokens) -> int:  # what reading the stored chunks holding ``tokens`` costs
        return sum(len(b.data) for ref in record.blocks if any(ref.start <= t < ref.end for t in tokens) for b in service.store.load_chunk(record, ref))

    window = set(range(4)) | set(range(doc.num_tokens - 32, doc.num_tokens))  # 4 sinks, 32 recent (a quarter of 128)
    first = real_client.retrieve("doc", 128, text="What does the license say about patents?")
    assert first.header.index_rebuilt and cache.bytes > 0  # built once (reads the session), then held in memory
    assert first.header.bytes_read == chunk_bytes(window)  # the probe read only its window's chunks
    hits = cache.hits
    second = real_client.retrieve("doc", 128, text="What does the license say about patents?", include_kv=True)
    assert cache.hits == hits + 1 and not second.header.index_rebuilt
    def layer_chunk_bytes(layer: int, tokens) -> int:
        return sum(len(b.data) for ref in record.blocks if any(ref.start <= t < ref.end for t in tokens) for b in service.store.load_chunk(record, ref, [layer]))

    selected = 0
    for number, layer in enumerate(second.layers):
        tokens = set(window)
        for start, length in zip(layer.block_starts, layer.block_lengths):
            tokens.update(range(start, start + length))
        selected += layer_chunk_bytes(number, tokens)
    # and then each layer's chunks for its own selected tokens, never the whole session
    assert second.header.bytes_read == first.header.bytes_read + selected < doc.kv_bytes
    # with query vectors nothing waits for the model: a Retrieve completes while another request holds it
    import threading

    held, release = threading.Event(), threading.Event()

    def hold():
        with service.host.use():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        vectors = real_client.retrieve("doc", 128, query_vectors=[torch.randn(9, 4, 64) for _ in range(30)])
        assert len(vectors.layers) == 30 and release.is_set() is False
    finally:
        release.set()
        holder.join()


@pytest.mark.slow
def test_retrieve_bad_requests(real_client):
    cases = [
        (dict(budget_tokens=0, text="q"), grpc.StatusCode.INVALID_ARGUMENT, "budget_tokens"),
        (dict(budget_tokens=701, text="q"), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the session"),
        (dict(budget_tokens=256), grpc.StatusCode.INVALID_ARGUMENT, "exactly one query"),
        (dict(budget_tokens=256, text="q", token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "exactly one query"),
        (dict(budget_tokens=256, text="q", method="psychic"), grpc.StatusCode.INVALID_ARGUMENT, "unknown retrieval method"),
        (dict(budget_tokens=256, query_vectors=[torch.randn(9, 4, 32)] * 30), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        (dict(budget_tokens=256, query_vectors=[torch.randn(9, 4, 64)] * 29), grpc.StatusCode.INVALID_ARGUMENT, "layers"),
        (dict(budget_tokens=256, query_vectors=[torch.full((9, 4, 64), float("nan"))] * 30), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        (dict(budget_tokens=256, query_vectors=[torch.randn(9, 4, 64)] * 29 + [torch.full((9, 4, 64), float("inf"))]), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ]
    for kwargs, code, message in cases:
        with pytest.raises(errors.KvmemError) as info:
            real_client.retrieve("doc", **kwargs)
        assert info.value.code == code and message in str(info.value), (kwargs.keys(), str(info.value))
    with pytest.raises(errors.NotFound):
        real_client.retrieve("nope", 64, text="q")
    fine = real_client.retrieve("doc", 256, query_vectors=[torch.randn(9, 4, 64) for _ in range(30)])
    assert len(fine.layers) == 30  # caller-computed query vectors work, and nothing above broke the server


def test_retrieve_refuses_sessions_of_another_model(client):
    client.save("toy", random_layers(TOY_SPEC, 64), list(range(64)))
    with pytest.raises(errors.FailedPrecondition, match="hosts that model"):
        client.retrieve("toy", 32, text="q")


@pytest.mark.slow
def test_search_text_finds_the_planted_fact_and_survives_damage(real_client, service):
    response = real_client.search_text("doc", "What is the secret code for falcon?", k=3)
    assert response.index_rebuilt and len(response.hits) == 3
    assert FACT in response.hits[0].text and response.hits[0].score > response.hits[1].score
    again = real_client.search_text("doc", "What is the secret code for falcon?", k=3)
    assert not again.index_rebuilt and [h.chunk for h in again.hits] == [h.chunk for h in response.hits]
    _flip_aux_byte(service.store, aux_key(session_key("default", "doc"), TEXT_INDEX), -5, 0x01)
    repaired = real_client.search_text("doc", "What is the secret code for falcon?", k=3)
    assert repaired.index_rebuilt and [h.chunk for h in repaired.hits] == [h.chunk for h in response.hits]
    with pytest.raises(errors.InvalidRequest, match="empty"):
        real_client.search_text("doc", "   ")


def test_search_text_needs_saved_text(client):
    client.save("mute", random_layers(TOY_SPEC, 32), list(range(32)))
    with pytest.raises(errors.FailedPrecondition, match="without text"):
        client.search_text("mute", "anything")
    with pytest.raises(errors.NotFound):
        client.search_text("missing", "anything")


@pytest.mark.slow
def test_saves_are_indexed_in_the_background(tmp_path, smollm2, real_session):
    from kvmem.config import ModelConfig, RetrievalSettings, ServerConfig, ServiceConfig
    from kvstore.store import StoreConfig
    from server import create_service
    from tests.conftest import MODEL_CACHE

    model, _ = smollm2
    ids, cache = real_session
    config = ServiceConfig(
        server=ServerConfig(port=0, log_format="text"),
        store=StoreConfig(data_dir=tmp_path / "bg", lmdb_map_bytes=64 << 20),
        model=ModelConfig(cache_dir=str(MODEL_CACHE), prepare=False),
        retrieval=RetrievalSettings(index_on_save=True),
    )
    service = create_service(config).start()
    try:
        with Client(f"127.0.0.1:{service.port}", spec=ModelSpec.from_model(model)) as client:
            client.save("doc", cache, ids)
            service.indexer.wait_idle()
            assert block_index_stored(service.store, "default", "doc", index_config_from(config.retrieval))
            assert not client.retrieve("doc", 256, text="patents").header.index_rebuilt
    finally:
        service.stop(grace=1)


def test_each_index_setting_has_its_own_stored_index_and_a_mismatch_is_detected(store):
    """Two requests with different index settings never share an index (the first one built
    used to decide for every later one), and an index stored under the wrong settings is
    detected and rebuilt, never searched."""
    from tests.conftest import random_layers
    from tests.test_retrieval_index import ROPE
    from tests.test_store import pieces_for

    spec = ModelSpec("toy-16", num_layers=2, num_kv_heads=2, head_dim=16, max_position=4096)
    store.save("t", "doc", spec, np.arange(200), pieces_for(store, random_layers(spec, 200, seed=1), spec=spec))
    exact, coarse = BlockIndexConfig(block_tokens=32), BlockIndexConfig(block_tokens=32, representatives=2)
    first = block_index(store, ROPE, "t", "doc", exact)
    assert first.rebuilt and first.index.config == exact
    other = block_index(store, ROPE, "t", "doc", coarse)
    assert other.rebuilt and other.index.config == coarse  # not the exact index stored a moment ago
    for config in (exact, coarse):
        again = block_index(store, ROPE, "t", "doc", config)
        assert not again.rebuilt and again.index.config == config
        assert block_index_stored(store, "t", "doc", config)
    assert not block_index_stored(store, "t", "doc", BlockIndexConfig(block_tokens=16))
    record = store.get("t", "doc")
    misfiled = {_layer_name(coarse, layer): bytes(store.get_aux("t", "doc", _layer_name(exact, layer)).payload) for layer in range(2)}
    store.put_aux("t", "doc", misfiled, record)  # the exact index's layers under the coarse settings' names
    repaired = block_index(store, ROPE, "t", "doc", coarse)
    assert repaired.rebuilt and "was built with" in repaired.reason and repaired.index.config == coarse
    assert not block_index(store, ROPE, "t", "doc", coarse).rebuilt


@pytest.mark.slow
def test_answer_kv_retrieval_reads_only_what_it_uses_and_answers_as_from_the_whole_session(store, smollm2, real_session):
    from dataclasses import replace

    from retrieval.context import RetrievalConfig, SessionKV, answer
    from retrieval.executors import AnswerRequest, ExecutorSettings, run_kv_retrieval

    model, tokenizer = smollm2
    ids, cache = real_session
    record = _save_real(store, model, ids, cache)
    question = "\n\nQuestion: What does the license say about patents? Answer:"
    settings = replace(ExecutorSettings(), kv_budget_tokens=256, max_new_tokens=8)
    execution = run_kv_retrieval(AnswerRequest(model, tokenizer, store, "t", "doc", question, settings))
    whole = SessionKV.from_plan(store.restore("t", "doc"))
    index = block_index(store, Rope.from_model(model), "t", "doc", settings.block_index).index
    question_ids = tokenizer(question, return_tensors="pt", add_special_tokens=False).input_ids[0]
    expected = answer(model, whole, index, question_ids, RetrievalConfig(budget_tokens=256), max_new_tokens=8).token_ids.tolist()
    eos = tokenizer.eos_token_id
    assert execution.token_ids == (expected[: expected.index(eos)] if eos in expected else expected)
    assert 0 < execution.details["bytes_read"] < record.kv_bytes  # the window's and the selection's chunks, not the session
