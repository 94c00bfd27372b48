"""Recall over gRPC on the real model: a compacted session answers a needle that compaction alone
loses once exact KV is recalled from its original (restore(recall_for=...) and Answer's
compacted_recall), reads only what it recalls, and refuses what it cannot do with clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmem.client import Client
from kvstore import errors
from kvstore.spec import ModelSpec
from compaction.inference import generation_inputs

pytestmark = pytest.mark.slow  # the hosted SmolLM2 runs every question

FACT = "The secret code for falcon is 4821937."
QUESTION = "\n\nQuestion: What is the secret code for falcon? Answer: The secret code for falcon is"
CODE = "4821937"
BUDGET = 64  # test_recall_s_exact_index...: ~6% of the ~1,070-token context (4 representatives need 128 here, every key 32)


@pytest.fixture(scope="module")
def needle(smollm2, long_text):
    """(token ids [1, T], cache, text): ~1,070 tokens of licence text with FACT after ~400."""
    model, tokenizer = smollm2
    text = long_text[:1800] + "\n" + FACT + "\n" + long_text[1800:4800]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    return ids, cache, text


@pytest.fixture
def recall_client(service, smollm2, needle):
    """A client with "doc" saved and compacted to 10% by StreamingLLM (sinks + recent: the fact is gone)."""
    model, _ = smollm2
    ids, cache, text = needle
    with Client(f"127.0.0.1:{service.port}", spec=ModelSpec.from_model(model)) as client:
        client.save("doc", cache, ids, text=text)
        client.compact("doc", "streaming_llm", ratio=0.1)
        yield client


COMPACTED = "doc@streaming_llm-r0.1"


def _question_ids(tokenizer) -> torch.Tensor:
    return tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids[0]


def _generate(model, tokenizer, restored, question: torch.Tensor) -> str:
    length = restored.info.logical_length
    inputs = generation_inputs(length, question.view(1, -1))
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), cache=restored.cache, max_new_tokens=10, do_sample=False)
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)


def test_restore_with_recall_answers_the_needle_compaction_alone_loses(recall_client, smollm2, needle):
    model, tokenizer = smollm2
    question = _question_ids(tokenizer)
    alone = recall_client.restore(COMPACTED, model=model)
    assert alone.recalled_tokens == 0 and CODE not in _generate(model, tokenizer, alone, question)
    recalled = recall_client.restore(COMPACTED, model=model, recall_for=question, recall_tokens=128)
    assert CODE in _generate(model, tokenizer, recalled, question)
    slots = alone.layers[0][0].shape[1]
    assert recalled.recalled_tokens == 128 and recalled.layers[0][0].shape[1] == slots + 128
    # the recalled slots are the exact stored KV of the tokens the header names, at their positions
    ids, cache, _ = needle
    positions = recalled.positions[slots:]
    assert torch.equal(recalled.token_ids[slots:], ids[0, positions])
    for layer in (0, 17, 29):
        assert torch.equal(recalled.layers[layer][0][:, slots:], cache.layers[layer].keys[0][:, positions])
        assert torch.equal(recalled.layers[layer][1][:, slots:], cache.layers[layer].values[0][:, positions])
        assert torch.all(recalled.bias[layer][:, slots:] == 0)
    # only the chunks that hold the recalled tokens were read (16-token chunks)
    per_token = ModelSpec.from_model(model).bytes_per_token
    chunks = len({int(p) // 16 for p in positions})
    assert 128 * per_token <= recalled.recall_bytes_read < (chunks + 1) * 16 * per_token  # those chunks (and their headers), not one more
    assert recall_client.get("doc").kv_bytes > 5 * recalled.recall_bytes_read  # 128 tokens of 1,070, not the session
    tiny = recall_client.restore(COMPACTED, model=model, recall_for=question, recall_tokens=1)
    assert tiny.recalled_tokens == 1  # the budget counts tokens exactly (a block is cut), never rounded up to blocks


def test_answer_compacted_recall_finds_the_needle_and_says_what_it_did(recall_client):
    alone = recall_client.answer("doc", QUESTION, force="compacted", max_new_tokens=10)
    with_recall = recall_client.answer("doc", QUESTION, force="compacted_recall", max_new_tokens=10)
    assert with_recall.decision.choice == "compacted_recall" and CODE in with_recall.text
    assert {"recall", "generate"} <= set(with_recall.stages)
    # the compacted session answers from the server's setting (streaming_llm at 0.5 here): both
    # share it, so recall's preparation is only the source's block index
    assert "compact" not in with_recall.stages and alone.decision.choice == "compacted"
    tiny = recall_client.answer("doc", QUESTION, force="compacted_recall", max_new_tokens=10, recall_budget_tokens=1)
    assert tiny.decision.choice == "compacted_recall"  # a per-request budget runs (1 token cannot hold the fact)


def test_per_request_budgets_out_of_range_are_invalid_and_change_nothing(recall_client):
    before = [(s.session_id, s.version) for s in recall_client.list()]
    for budgets, message in [
        (dict(rag_budget_tokens=1 << 30), "rag_budget_tokens"),
        (dict(rag_budget_tokens=9000), "window"),
        (dict(kv_budget_tokens=1 << 30), "kv_budget_tokens"),
        (dict(recall_budget_tokens=1 << 30), "recall_budget_tokens"),
    ]:
        with pytest.raises(errors.InvalidRequest, match=message):
            recall_client.answer("doc", QUESTION, force="compacted_recall", **budgets)
    assert [(s.session_id, s.version) for s in recall_client.list()] == before


def test_bad_recall_requests_get_clear_errors_and_change_nothing(recall_client, smollm2):
    model, tokenizer = smollm2
    question = _question_ids(tokenizer)
    before = [(s.session_id, s.version, s.kv_bytes) for s in recall_client.list()]
    with pytest.raises(errors.FailedPrecondition, match="not compacted"):
        recall_client.restore("doc", model=model, recall_for=question)
    with pytest.raises(errors.InvalidRequest, match="empty"):
        recall_client.restore(COMPACTED, model=model, recall_for=[])
    with pytest.raises(errors.InvalidRequest, match="vocabulary"):
        recall_client.restore(COMPACTED, model=model, recall_for=[1, 10**9])
    with pytest.raises(errors.InvalidRequest, match="whole compacted session"):
        recall_client.restore(COMPACTED, model=model, recall_for=question, start=0, end=10)
    with pytest.raises(errors.InvalidRequest, match="window"):
        recall_client.restore(COMPACTED, model=model, recall_for=[5] * 8000)
    with pytest.raises(errors.NotFound):
        recall_client.restore("nope", model=model, recall_for=question)
    assert [(s.session_id, s.version, s.kv_bytes) for s in recall_client.list()] == before


def test_recall_refuses_a_source_that_changed_or_is_gone(recall_client, smollm2, needle):
    model, tokenizer = smollm2
    question = _question_ids(tokenizer)
    ids, cache, text = needle
    recall_client.save("doc", cache, ids, text=text, overwrite=True)  # same tokens, a new version
    with pytest.raises(errors.FailedPrecondition, match="changed since"):
        recall_client.restore(COMPACTED, model=model, recall_for=question)
    recall_client.compact("doc", "streaming_llm", ratio=0.2, drop_source=True, replace=True)
    with pytest.raises(errors.FailedPrecondition, match="keeps no source"):
        recall_client.restore("doc", model=model, recall_for=question)
    recall_client.delete("doc")
    with pytest.raises(errors.FailedPrecondition, match="was deleted"):
        recall_client.restore(COMPACTED, model=model, recall_for=question)


# ---------------------------------------------------------------------------- recall's own index settings
TENANT = "t"


@pytest.fixture
def compacted_needle(store, smollm2, needle):
    """(store, CompactedKV): the needle saved as "doc" in a store of 16-token chunks and compacted to
    10% by StreamingLLM (the fact is gone from the slots)."""
    import numpy as np

    from compaction.base import Target
    from compaction.service import compact_session
    from retrieval.recall import load_compacted

    model, _ = smollm2
    ids, cache, _ = needle
    spec = ModelSpec.from_model(model)
    length = ids.shape[1]
    pieces = store.new_pieces(spec, 0, length)
    for layer in range(len(cache.layers)):
        pieces.add_tensors(layer, 0, cache.layers[layer].keys[0], cache.layers[layer].values[0])
    store.save(TENANT, "doc", spec, ids[0].numpy().astype(np.uint32), pieces)
    report = compact_session(store, None, TENANT, "doc", "streaming_llm", Target(ratio=0.1))
    return store, load_compacted(store, TENANT, report.record.session_id)


def _answer(model, tokenizer, recalled, question) -> str:
    from retrieval.executors import generate_on

    ids = generate_on(model, list(zip(recalled.keys, recalled.values)), recalled.bias, recalled.logical_length, question, 10)
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_recall_uses_its_own_index_settings_and_never_another(compacted_needle, smollm2):
    from retrieval.block_index import BlockIndexConfig
    from retrieval.recall import RecallConfig, recall
    from retrieval.rope import Rope
    from retrieval.service import block_index, block_index_stored

    store, compacted = compacted_needle
    model, tokenizer = smollm2
    question = _question_ids(tokenizer)
    server = BlockIndexConfig(representatives=4)  # the Retrieve RPC's settings
    fine = RecallConfig(budget_tokens=96, block_tokens=16, representatives=0, margin_tokens=0)
    recalled = recall(model, store, compacted, question, fine, server)
    # whole 16-token blocks (no margins): every recalled run is 16-aligned, and the budget is exact
    for tokens in recalled.tokens:
        assert len(tokens) == 96 and np.all(np.diff(tokens) > 0)
        starts = tokens[np.r_[True, np.diff(tokens) > 1]]
        ends = tokens[np.r_[np.diff(tokens) > 1, True]] + 1
        assert np.all(starts % 16 == 0) and np.all(ends % 16 == 0)
    assert recalled.selection.layers[0].blocks.size == 6
    # recall stored its own index beside the source; the server's settings were never built or searched
    assert block_index_stored(store, TENANT, "doc", fine.index_config(server))
    assert not block_index_stored(store, TENANT, "doc", server)
    # margins are counted: with 8 on both sides of 16-token blocks, 96 tokens hold fewer blocks
    widened = recall(model, store, compacted, question, RecallConfig(budget_tokens=96, block_tokens=16, representatives=0, margin_tokens=8), server)
    assert all(len(t) == 96 for t in widened.tokens) and widened.selection.layers[0].blocks.size < 6
    # an index built with other settings is refused, never searched
    coarse = block_index(store, Rope.from_model(model), TENANT, "doc", server).index
    with pytest.raises(errors.InvalidRequest, match="settings"):
        recall(model, store, compacted, question, fine, server, coarse)


def test_recall_s_exact_index_finds_the_needle_in_a_budget_the_representatives_miss(compacted_needle, smollm2):
    from retrieval.block_index import BlockIndexConfig
    from retrieval.recall import RecallConfig, recall

    store, compacted = compacted_needle
    model, tokenizer = smollm2
    question = _question_ids(tokenizer)
    server = BlockIndexConfig(representatives=4)
    coarse = RecallConfig(budget_tokens=BUDGET, block_tokens=64, representatives=4, margin_tokens=16)  # the Retrieve RPC's index
    assert CODE not in _answer(model, tokenizer, recall(model, store, compacted, question, coarse, server), question)
    for fine in (RecallConfig(budget_tokens=BUDGET), RecallConfig(budget_tokens=BUDGET, block_tokens=16, margin_tokens=8)):  # defaults; finer
        assert CODE in _answer(model, tokenizer, recall(model, store, compacted, question, fine, server), question)
