"""Query-only test-time training on SmolLM2: frozen cache, shadow weights, isolation."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from kvstore import errors
from kvmem.hf_cache import cache_to_layers
from retrieval.ttt import FrozenSpanCache, TTTConfig, adapt, heldout_loss, query_parameters, query_shadow, query_weights_digest, span_loss, span_starts


@pytest.fixture(scope="module")
def context(smollm2, long_text):
    """context ids [T] and their frozen prefill (keys, values per layer [H, T, D])."""
    model, tokenizer = smollm2
    ids = tokenizer(long_text, return_tensors="pt", add_special_tokens=False).input_ids[0, :600]
    with torch.no_grad():
        layers = cache_to_layers(model(ids[None], use_cache=True).cache)
    return ids, [k.clone() for k, _ in layers], [v.clone() for _, v in layers]


@pytest.mark.slow
def test_frozen_span_loss_equals_the_models_own_loss(smollm2, context):
    """Before any update, a span over the frozen cache is exactly the model's next-token loss."""
    model, _ = smollm2
    ids, keys, values = context
    start, span = 200, 64
    with torch.no_grad():
        logits = model(ids[None, : start + span]).logits[0, start:]
        expected = F.cross_entropy(logits, ids[start + 1 : start + span + 1])
        got = span_loss(model, ids, keys, values, start, span)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_frozen_cache_hands_back_the_prefill_states(smollm2, context):
    model, _ = smollm2
    ids, keys, values = context
    cache = FrozenSpanCache(keys, values, 100, model.config)
    assert cache.get_seq_length() == 100
    k, v = cache.update(torch.zeros(1, 3, 10, 64), torch.zeros(1, 3, 10, 64), 5)
    assert torch.equal(k[0], keys[5][:, :110]) and torch.equal(v[0], values[5][:, :110])


@pytest.mark.slow
def test_shadow_shares_everything_but_the_query_projections(smollm2):
    model, _ = smollm2
    shadow, trainable = query_shadow(model)
    hosted = dict(model.named_parameters())
    for name, param in shadow.named_parameters():
        same_storage = param.data_ptr() == hosted[name].data_ptr()
        assert same_storage != (".q_proj." in name), name
    assert len(trainable) == model.config.num_hidden_layers and all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for n, p in shadow.named_parameters() if ".q_proj." not in n)
    assert all(p.requires_grad for p in model.parameters())  # the hosted model's flags are untouched


@pytest.mark.slow
def test_training_lowers_held_out_loss_and_leaves_the_hosted_model_bit_exact(smollm2, context):
    model, _ = smollm2
    ids, keys, values = context
    before = {n: p.detach().clone() for n, p in query_parameters(model)}
    digest = query_weights_digest(model)
    held = span_starts(ids.numel(), TTTConfig(steps=4, seed=123))
    base = heldout_loss(model, ids, keys, values, held, 128)
    shadow, report = adapt(model, ids, keys, values, TTTConfig(steps=6, learning_rate=1e-3))
    assert report.weights_unchanged and len(report.losses) == 6
    assert query_weights_digest(model) == digest
    for name, param in query_parameters(model):
        assert torch.equal(param, before[name]), name
    changed = dict(query_parameters(shadow))
    assert any(not torch.equal(changed[n], before[n]) for n in before)
    assert heldout_loss(shadow, ids, keys, values, held, 128) < base
    assert heldout_loss(model, ids, keys, values, held, 128) == pytest.approx(base, abs=1e-6)  # hosted model unaffected


@pytest.mark.slow
def test_concurrent_adaptations_never_see_each_other(smollm2, context):
    """Two requests training at once (different seeds) end where they end alone. Not bit for bit:
    concurrent requests share torch's intra-op thread pool, which changes the reduction order of
    some kernels (~1e-5 per weight); a leaked update would move them by the size of an update."""
    model, _ = smollm2
    ids, keys, values = context
    original = {name: param.detach().clone() for name, param in query_parameters(model)}
    configs = [TTTConfig(steps=3, seed=1), TTTConfig(steps=3, seed=2, learning_rate=3e-3)]
    alone = [dict(query_parameters(adapt(model, ids, keys, values, c)[0])) for c in configs]
    together: list = [None, None]

    def work(i):
        together[i] = dict(query_parameters(adapt(model, ids, keys, values, configs[i])[0]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for name, param in alone[i].items():
            update = torch.linalg.norm(param - original[name])
            assert update > 1e-3  # the request did train this weight
            assert torch.linalg.norm(together[i][name] - param) <= 0.01 * update
    assert all(torch.equal(param, original[name]) for name, param in query_parameters(model))  # hosted model untouched
    name = next(iter(alone[0]))
    assert not torch.allclose(alone[0][name], alone[1][name])


def test_bad_settings_and_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(errors.InvalidRequest, match="steps"):
        TTTConfig(steps=-1)
    with pytest.raises(errors.InvalidRequest, match="span_tokens"):
        TTTConfig(span_tokens=1)
    with pytest.raises(errors.InvalidRequest, match="learning_rate"):
        TTTConfig(learning_rate=0.0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    with pytest.raises(errors.FailedPrecondition, match="q_proj"):
        query_weights_digest(gpt2)
    with pytest.raises(errors.InvalidRequest, match="at least 3 tokens"):
        span_starts(2, TTTConfig())
