"""Running SmolLM2 on compacted caches: positions continue at the original length, biases act
exactly like duplicated keys, dropped tokens act exactly like masked ones, generate works."""
import copy

import pytest
import torch

from compaction.inference import CompactedCache, generation_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def context(smollm2, long_text):
    model, tokenizer = smollm2
    ids = tokenizer(long_text, return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    layers = [(layer.keys[0].clone(), layer.values[0].clone()) for layer in out.cache.layers]
    return ids, out.cache, layers


def _next_logits(model, cache, token, **kwargs):
    with torch.no_grad():
        return model(token, cache=cache, use_cache=True, **kwargs).logits[0, -1]


def test_keeping_everything_matches_the_plain_cache(smollm2, context):
    model, _ = smollm2
    ids, cache, layers = context
    step = torch.tensor([[1000, 2000, 3000]])  # three new tokens: causal among themselves
    plain = model(step, cache=copy.deepcopy(cache), use_cache=True).logits
    compacted = CompactedCache.for_model(model, layers, [None] * len(layers), logical_length=ids.shape[1])
    assert compacted.get_seq_length() == ids.shape[1]
    with torch.no_grad():
        ours = model(step, cache=compacted, use_cache=True).logits
    assert torch.allclose(plain, ours, atol=1e-4)


def test_dropped_tokens_equal_masked_tokens_at_the_original_positions(smollm2, context):
    model, _ = smollm2
    ids, cache, layers = context
    total = ids.shape[1]
    keep = torch.ones(total, dtype=torch.bool)
    keep[20:120] = False  # drop 100 middle tokens
    mask = torch.cat([keep.long(), torch.ones(1, dtype=torch.long)]).view(1, -1)
    token = torch.tensor([[4000]])
    expected = _next_logits(model, copy.deepcopy(cache), token, attention_mask=mask)
    kept_layers = [(k[:, keep], v[:, keep]) for k, v in layers]
    compacted = CompactedCache.for_model(model, kept_layers, [None] * len(layers), logical_length=total)
    assert torch.allclose(_next_logits(model, compacted, token), expected, atol=1e-4)


def test_bias_log2_equals_a_duplicated_key(smollm2, context):
    model, _ = smollm2
    ids, _, layers = context
    j, token = 50, torch.tensor([[4000]])
    heads = layers[0][0].shape[0]
    duplicated = [(torch.cat([k, k[:, j : j + 1]], 1), torch.cat([v, v[:, j : j + 1]], 1)) for k, v in layers]
    with_duplicate = CompactedCache.for_model(model, duplicated, [None] * len(layers), logical_length=ids.shape[1])
    bias = torch.zeros(heads, ids.shape[1])
    bias[:, j] = torch.log(torch.tensor(2.0))
    with_bias = CompactedCache.for_model(model, layers, [bias] * len(layers), logical_length=ids.shape[1])
    assert torch.allclose(_next_logits(model, with_duplicate, token), _next_logits(model, with_bias, token), atol=1e-4)


def test_padded_slots_are_invisible_and_generate_runs(smollm2, context):
    model, tokenizer = smollm2
    ids, cache, layers = context
    heads, total = layers[0][0].shape[:2]
    padded = [(torch.cat([k, torch.randn(heads, 7, k.shape[2]) * 50], 1), torch.cat([v, torch.randn(heads, 7, v.shape[2]) * 50], 1)) for k, v in layers]
    bias = torch.cat([torch.zeros(heads, total), torch.full((heads, 7), float("-inf"))], 1)
    compacted = CompactedCache.for_model(model, padded, [bias] * len(layers), logical_length=total)
    token = ids[:, -1:] * 0 + 13  # any token
    plain = CompactedCache.for_model(model, layers, [None] * len(layers), logical_length=total)
    assert torch.allclose(_next_logits(model, compacted, token), _next_logits(model, plain, token), atol=1e-4)

    fresh = CompactedCache.for_model(model, padded, [bias] * len(layers), logical_length=total)
    prompt = generation_inputs(total, tokenizer(" In short,", return_tensors="pt").input_ids)
    with torch.no_grad():
        out = model.generate(prompt, cache=fresh, max_new_tokens=8, do_sample=False)
    reference = model.generate(torch.cat([ids, prompt[:, total:]], 1), cache=copy.deepcopy(cache), max_new_tokens=8, do_sample=False)
    assert torch.equal(out[:, total:], reference[:, total:])  # same continuation as the full cache
