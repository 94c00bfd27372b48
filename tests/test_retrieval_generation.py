"""Retrieved-context inference on the real model: the long prefill, the assembled cache, and the
needle acceptance check past the model's window."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmem.hf_cache import cache_to_layers, layers_to_cache
from retrieval.block_index import BlockIndex
from retrieval.context import RetrievalConfig, SessionKV, answer
from retrieval.long_prefill import windowed_prefill
from retrieval.rope import Rope

pytestmark = pytest.mark.slow  # every test runs SmolLM2 (one prefills 16k tokens)


def test_rope_matches_the_models_own_rotary_embedding(smollm2):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = smollm2
    rope = Rope.from_model(model)
    x = torch.randn(1, 3, 4, 64)
    positions = torch.tensor([[0, 5, 300, 4000]])
    cos, sin = model.model.rotary_emb(x, positions)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    ours = rope.rotate(x[0], positions[0])
    assert torch.allclose(ours[:, :2], expected[0, :, :2], atol=2e-6)
    # at large positions transformers' float32 angles drift (ours are float64): still close
    assert torch.allclose(ours, expected[0], atol=2e-3)


def test_windowed_prefill_is_a_plain_prefill_while_everything_fits(smollm2, long_text):
    model, tokenizer = smollm2
    ids = tokenizer(long_text, return_tensors="pt").input_ids[:, :700]
    with torch.no_grad():
        plain = cache_to_layers(model(ids, use_cache=True).cache)
    keys, values = windowed_prefill(model, ids, window_tokens=1024, chunk_tokens=256)  # 3 chunks, all in view
    assert max((k - p[0]).abs().max().item() for k, p in zip(keys, plain)) < 1e-3
    assert max((v - p[1]).abs().max().item() for v, p in zip(values, plain)) < 1e-3
    short_keys, _ = windowed_prefill(model, ids, window_tokens=128, chunk_tokens=128)  # a real sliding window
    assert (short_keys[-1][:, 400:] - plain[-1][0][:, 400:]).abs().max() > 0.1
    assert torch.allclose(short_keys[-1][:, :256], plain[-1][0][:, :256], atol=1e-3)  # the first chunks saw everything


def test_budget_of_the_whole_session_reproduces_the_full_cache(smollm2, long_text):
    model, tokenizer = smollm2
    ids = tokenizer(long_text, return_tensors="pt").input_ids[:, :768]
    question = tokenizer("\n\nQuestion: What does this license protect? Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        full = model.generate(torch.cat([ids, question], 1), cache=cache, max_new_tokens=8, do_sample=False)
        layers = cache_to_layers(model(ids, use_cache=True).cache)
    kv = SessionKV([k for k, _ in layers], [v for _, v in layers], torch.arange(768))
    index = BlockIndex.build(kv.keys, kv.positions, Rope.from_model(model))
    config = RetrievalConfig(budget_tokens=768, sink_tokens=64, recent_tokens=768, packed=False)  # 1 sink block, 8 retrieved, 3 recent
    result = answer(model, kv, index, question[0], config, max_new_tokens=8)
    assert result.layout.original and result.selection.tokens_per_layer == [768] * 30
    assert torch.equal(result.token_ids, full[0, 768 + question.shape[1]:])


# ---------------------------------------------------------------------------- acceptance: 16k needles
NEEDLE_TASKS = [("single", 0.2, 100), ("single", 0.4, 101), ("single", 0.6, 102)]  # (kind, depth, seed)


@pytest.fixture(scope="module")
def needle_sessions(smollm2):
    """Three 16k-token needle tasks (twice the model's window), their windowed-prefill KV and index."""
    from bench.tasks import TaskFactory

    model, tokenizer = smollm2
    factory = TaskFactory(tokenizer)
    sessions = []
    for kind, depth, seed in NEEDLE_TASKS:
        task = factory.make(kind, 16000, depth, seed)
        keys, values = windowed_prefill(model, task.context_ids, window_tokens=2048)
        kv = SessionKV(keys, values, torch.arange(16000))
        sessions.append((task, kv, BlockIndex.build(keys, kv.positions, Rope.from_model(model))))
    return sessions


def test_actqkv_finds_needles_in_16k_tokens_where_truncation_cannot(smollm2, needle_sessions):
    from bench.tasks import score_answer

    model, tokenizer = smollm2
    retrieved, truncated = [], []
    for task, kv, index in needle_sessions:
        result = answer(model, kv, index, task.question_ids[0], RetrievalConfig(method="actqkv", budget_tokens=2048))
        needle = [n for n in task.needles if n["asked"]][0]["position"]
        needle_tokens = set(range(needle, needle + 15))  # " The secret code for <word> is <7 digits>."
        assert all(needle_tokens <= set(layer.tokens.tolist()) for layer in result.selection.layers), task.name
        assert result.layout.question_start < 8192 and np.mean(result.selection.tokens_per_layer) == pytest.approx(2048, abs=64)
        retrieved.append(score_answer(tokenizer.decode(result.token_ids), task.code))
        tail = torch.cat([task.context_ids[:, -2048:], task.question_ids], 1)  # the last 2k tokens cannot hold the needle
        assert needle < 16000 - 2048
        with torch.no_grad():
            out = model.generate(tail, max_new_tokens=24, do_sample=False)
        truncated.append(score_answer(tokenizer.decode(out[0, tail.shape[1]:]), task.code))
    assert sum(truncated) == 0
    assert sum(retrieved) >= 2, retrieved
