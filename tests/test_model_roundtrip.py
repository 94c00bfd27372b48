"""Acceptance on the real SmolLM2 through a real server: bit-exact logits, identical generation,
prefix dedup of a shared system prompt, Lookup, fork + append, delete isolation."""
import copy

import pytest
import torch

from kvmem.client import Client
from kvstore.spec import ModelSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def context_ids(smollm2, long_text):
    _, tokenizer = smollm2
    ids = tokenizer(long_text, return_tensors="pt").input_ids[:, :1500]
    assert ids.shape[1] == 1500
    return ids


@pytest.fixture(scope="module")
def prefilled(smollm2, context_ids):
    model, _ = smollm2
    with torch.no_grad():
        out = model(context_ids, use_cache=True)
    return out.cache, out.logits[0, -1]


@pytest.fixture
def model_client(service, smollm2):
    model, _ = smollm2
    with Client(f"127.0.0.1:{service.port}", spec=ModelSpec.from_model(model)) as client:
        yield client


def test_restored_cache_gives_bit_exact_logits_and_identical_generation(service, smollm2, context_ids, prefilled):
    model, _ = smollm2
    cache, last_logits = prefilled
    spec = ModelSpec.from_model(model)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    with Client(f"127.0.0.1:{service.port}", spec=spec) as saver:
        saver.save("ctx", cache, context_ids)
    with Client(f"127.0.0.1:{service.port}", spec=spec) as worker:  # another worker restores it
        restored = worker.restore("ctx", config=model.config)
    assert restored.token_ids.tolist() == context_ids[0].tolist()
    next_token = last_logits.argmax().view(1, 1)
    with torch.no_grad():
        original = model(next_token, cache=copy.deepcopy(cache), use_cache=True).logits
        from_store = model(next_token, cache=restored.cache, use_cache=True).logits
    assert torch.equal(original, from_store)  # bit-exact: the codec is lossless

    again = Client(f"127.0.0.1:{service.port}", spec=spec).restore("ctx", config=model.config)
    prompt = torch.cat([context_ids, next_token], dim=1)
    with torch.no_grad():
        expected = model.generate(prompt, cache=copy.deepcopy(cache), max_new_tokens=20, do_sample=False)
        got = model.generate(prompt, cache=again.cache, max_new_tokens=20, do_sample=False)
    assert torch.equal(expected, got) and got.shape[1] == prompt.shape[1] + 20


def _prefill(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=True).cache


def test_shared_system_prompt_is_stored_once(service, smollm2, context_ids, model_client):
    model, tokenizer = smollm2
    system = context_ids[:, :1024]
    user_a = tokenizer(" Question one: what does the licence say about patents?", return_tensors="pt").input_ids
    user_b = tokenizer(" Question two: may I sell copies of the program for a fee?", return_tensors="pt").input_ids
    ids_a, ids_b = torch.cat([system, user_a], 1), torch.cat([system, user_b], 1)
    cache_a, cache_b = _prefill(model, ids_a), _prefill(model, ids_b)
    spec = model_client.spec

    model_client.save("a", cache_a, ids_a)
    after_a = model_client.stats()
    assert model_client.lookup(ids_b) == 1024  # the shared system prompt is already stored
    saved_b = model_client.save("b", cache_b, ids_b)
    after_b = model_client.stats()
    assert saved_b.deduplicated_tokens == 1024
    tail_bytes = ids_b.shape[1] - 1024
    lmdb_a, lmdb_b = [next(t for t in s.tiers if t.name == "lmdb").bytes_used for s in (after_a, after_b)]
    # Measured in LMDB: the second session added only its own tail, not another 1,024-token prefix.
    assert after_b.stored_bytes - after_a.stored_bytes < (tail_bytes + 64) * spec.bytes_per_token
    assert lmdb_b - lmdb_a < 0.2 * lmdb_a
    assert after_b.logical_bytes == (ids_a.shape[1] + ids_b.shape[1]) * spec.bytes_per_token

    # Deleting one session leaves the other intact and bit-exact.
    model_client.delete("a")
    restored_b = model_client.restore("b", config=model.config)
    original_layers = [(layer.keys[0], layer.values[0]) for layer in cache_b.layers]
    assert all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in zip(original_layers, restored_b.layers))
    assert model_client.lookup(ids_a) == 1024


def test_fork_and_append_diverge(service, smollm2, context_ids, model_client):
    model, tokenizer = smollm2
    base = context_ids[:, :600]
    model_client.save("agent", _prefill(model, base), base)
    model_client.fork("agent", "agent-alt", at_token=600)
    turn_a = tokenizer(" The user asks about warranty.", return_tensors="pt").input_ids
    turn_b = tokenizer(" The user asks about source code.", return_tensors="pt").input_ids
    for session, turn in (("agent", turn_a), ("agent-alt", turn_b)):
        restored = model_client.restore(session, config=model.config)
        with torch.no_grad():
            grown = model(turn, cache=restored.cache, use_cache=True).cache
        model_client.append(session, grown, turn)
    a, b = model_client.restore("agent", config=model.config), model_client.restore("agent-alt", config=model.config)
    assert a.token_ids.tolist() == torch.cat([base, turn_a], 1)[0].tolist()
    assert b.token_ids.tolist() == torch.cat([base, turn_b], 1)[0].tolist()
    # The shared part is identical, the appended turns differ, and each equals a fresh prefill.
    assert torch.equal(a.layers[5][0][:, :600], b.layers[5][0][:, :600])
    assert not torch.equal(a.layers[5][0][:, -1], b.layers[5][0][:, -1])  # the turns end in different words
    fresh = _prefill(model, torch.cat([base, turn_b], 1))
    assert torch.allclose(fresh.layers[5].keys[0], b.layers[5][0], atol=1e-4)
    assert model_client.get("agent-alt").parent_session_id == "agent"
