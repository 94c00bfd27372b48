"""kvmem inside vLLM: real vLLM engines (the CPU build, in .venv-vllm) with the kvmem connector,
a real kvmem server process, the bundled SmolLM2.

Three engines start once for the module (each costs 25-50 s): two with the connector (one
saves, the other is fresh and must load) and one without it, the recompute baseline."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from kvmem.client import Client
from kvstore.chunking import block_storage_key
from kvstore.spec import ModelSpec
from kvstore.store import SessionStore, StoreConfig
from bench.vllm_engine import CPU_BLOCK_TOKENS as BLOCK, VLLM_PYTHON, Engine, prompt_tokens, wait_stored
from tests.conftest import MODEL_CACHE, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

@pytest.fixture(scope="module")
def model_dir(smollm2) -> Path:
    return MODEL_CACHE / "smollm2-135m-instruct"  # load_model (the smollm2 fixture) prepared it


@pytest.fixture(scope="module")
def kvmem_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("vllm-kvmem") / "data"
    server = ServerProcess(data, []).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def engines(model_dir, kvmem_server, tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make vllm-env` builds the vLLM environment (make test does)")
    logs = tmp_path_factory.mktemp("vllm-logs")
    # prefills of more than 512 tokens take several steps (chunked prefill): saves and loads must span them
    common = ["--model", str(model_dir), "--max-num-batched-tokens", "512"]
    connector = common + ["--kvmem", kvmem_server.address, "--extra", json.dumps({"kvmem_retry_after_s": 1.0})]
    started = {
        "saver": Engine("saver", connector, logs),
        "fresh": Engine("fresh", connector, logs),
        "plain": Engine("plain", common, logs),
    }
    yield started
    for engine in started.values():
        engine.stop()


@pytest.fixture(scope="module")
def spec(engines) -> ModelSpec:
    return ModelSpec.from_dict(engines["saver"].ask(op="spec"))


def test_the_connector_derives_the_spec_transformers_gives_the_same_checkpoint(spec, smollm2):
    model, _ = smollm2
    assert spec == ModelSpec.from_model(model)
    assert spec.weights_fingerprint  # the weights are part of the identity, read from the checkpoint


def test_a_fresh_engine_loads_the_stored_prefix_and_answers_exactly_as_recompute(engines, kvmem_server, spec):
    prompt, question = prompt_tokens(1000, 1), prompt_tokens(40, 2)
    first = engines["saver"].generate(prompt)
    assert first["cached"] == 0 and first["kv_transfer_params"]["kvmem_load_tokens"] == 0  # nothing stored yet
    full_blocks = (1000 // BLOCK) * BLOCK
    assert first["kv_transfer_params"]["kvmem_saved_tokens"] == full_blocks
    assert wait_stored(kvmem_server.address, spec, prompt, full_blocks) == full_blocks

    fresh = engines["fresh"].generate(prompt + question, max_tokens=16)
    recomputed = engines["plain"].generate(prompt + question, max_tokens=16)
    assert recomputed["cached"] == 0
    assert fresh["cached"] >= full_blocks
    assert fresh["kv_transfer_params"]["kvmem_load_tokens"] == full_blocks
    assert fresh["tokens"] == recomputed["tokens"]


def test_a_named_session_keeps_the_requests_tokens_and_sends_only_new_blocks(engines, kvmem_server, spec):
    context = prompt_tokens(700, 3)
    turn1 = engines["saver"].generate(context, max_tokens=4, kvmem_session="chat-7")
    assert turn1["kv_transfer_params"]["kvmem_session"] == "chat-7"
    assert wait_stored(kvmem_server.address, spec, context, 640) == 640
    with Client(kvmem_server.address, spec=spec) as client:
        assert client.get("chat-7").num_tokens == 640
        turn2 = engines["fresh"].generate(context + prompt_tokens(300, 4), max_tokens=4, kvmem_session="chat-7")
        assert turn2["kv_transfer_params"]["kvmem_load_tokens"] == 640
        deadline = time.monotonic() + 60
        while client.get("chat-7").num_tokens != 896 and time.monotonic() < deadline:
            time.sleep(0.2)
        info = client.get("chat-7")
        assert info.num_tokens == 896
        restored = client.restore("chat-7", build_cache=False)
        assert restored.token_ids.tolist() == (context + prompt_tokens(300, 4))[:896]


def test_kv_saved_by_transformers_restores_into_vllm_and_back(engines, kvmem_server, spec, smollm2):
    from kvmem.hf_cache import cache_to_layers

    model, _ = smollm2
    context, question = prompt_tokens(600, 5), prompt_tokens(30, 6)
    with torch.no_grad():
        cache = model(torch.tensor([context]), use_cache=True).past_key_values
    with Client(kvmem_server.address, spec=spec) as client:
        client.save("from-transformers", cache, context)
    into_vllm = engines["fresh"].generate(context + question, max_tokens=16)
    assert into_vllm["kv_transfer_params"]["kvmem_load_tokens"] == 512  # 600 tokens: 4 whole blocks
    assert into_vllm["tokens"] == engines["plain"].generate(context + question, max_tokens=16)["tokens"]

    # the other way: the prompt the saver engine stored, restored into transformers
    prompt = prompt_tokens(1000, 1)
    with Client(kvmem_server.address, spec=spec) as client:
        restored = client.restore_prefix(prompt, config=model.config)
    stored = len(restored.token_ids)
    assert stored >= 896
    with torch.no_grad():
        reference = cache_to_layers(model(torch.tensor([prompt[:stored]]), use_cache=True).past_key_values)
        for (keys, values), (ref_keys, ref_values) in zip(restored.layers, reference):
            torch.testing.assert_close(keys, ref_keys, atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(values, ref_values, atol=2e-4, rtol=1e-4)
        asked = torch.tensor([prompt + question])  # longer than the restored prefix: generate computes only the rest
        from_kvmem = model.generate(asked, cache=restored.cache, max_new_tokens=12, do_sample=False)
        from_scratch = model.generate(asked, max_new_tokens=12, do_sample=False)
    assert from_kvmem.tolist() == from_scratch.tolist()


def test_kvmem_extends_what_vllms_own_prefix_cache_already_holds(engines, kvmem_server, spec):
    """The saver engine holds X in its own prefix cache; kvmem holds X + Y (saved by the fresh
    engine): a request for X + Y + Z loads only Y's blocks, after vLLM's own hit."""
    x, y, z = prompt_tokens(1000, 10), prompt_tokens(300, 11), prompt_tokens(20, 12)
    engines["saver"].generate(x, max_tokens=2)
    assert wait_stored(kvmem_server.address, spec, x, 896) == 896
    engines["fresh"].generate(x + y, max_tokens=2)
    assert wait_stored(kvmem_server.address, spec, x + y, 1280) == 1280
    answer = engines["saver"].generate(x + y + z, max_tokens=16)
    assert answer["kv_transfer_params"]["kvmem_load_tokens"] == 1280 - 896  # tokens [896, 1280) from kvmem
    assert answer["cached"] >= 1280
    assert answer["tokens"] == engines["plain"].generate(x + y + z, max_tokens=16)["tokens"]


def test_damaged_kv_is_never_served_vllm_recomputes(engines, kvmem_server, spec):
    prompt, question = prompt_tokens(800, 7), prompt_tokens(20, 8)
    saved = engines["saver"].generate(prompt, max_tokens=2)
    session = saved["kv_transfer_params"]["kvmem_session"]
    assert wait_stored(kvmem_server.address, spec, prompt, 768) == 768
    assert kvmem_server.terminate() == 0
    store = SessionStore.open(StoreConfig(data_dir=kvmem_server.data_dir))
    try:
        record = store.get("default", session)
        key = block_storage_key(record.blocks[1].key, 3)

        def flip(txn):
            raw = bytearray(txn.get("blocks", key))
            raw[200] ^= 0x20
            txn.put("blocks", key, bytes(raw))

        store.backend.write(flip)
    finally:
        store.close()
    restart(kvmem_server)
    answer = engines["fresh"].generate(prompt + question, max_tokens=16)
    assert answer["kv_transfer_params"]["kvmem_load_tokens"] == 768  # planned from Lookup: the refs are intact
    assert answer["tokens"] == engines["plain"].generate(prompt + question, max_tokens=16)["tokens"]
    log = engines["fresh"].log_text()
    assert f"loading tokens [0, 768) of request" in log and "damaged" in log and "vLLM recomputes them" in log


def restart(server: ServerProcess) -> None:
    """Start the server again on its port (the engines know that address)."""
    port = server.port
    server.extra = ["--port", str(port)]
    server.start()
    assert server.port == port


def test_with_kvmem_down_vllm_recomputes_and_answers(engines, kvmem_server, spec):
    prompt = prompt_tokens(900, 9)
    assert kvmem_server.terminate() == 0
    try:
        answer = engines["fresh"].generate(prompt, max_tokens=16)
        assert answer["cached"] == 0
        assert answer["tokens"] == engines["plain"].generate(prompt, max_tokens=16)["tokens"]
        assert "lookup failed" in engines["fresh"].log_text()
    finally:
        restart(kvmem_server)
    time.sleep(1.5)  # the connector retries kvmem kvmem_retry_after_s (1 s here) after a failure
    again = engines["saver"].generate(prompt, max_tokens=2)
    assert again["kv_transfer_params"]["kvmem_saved_tokens"] == 896  # kvmem is used again once it is back
