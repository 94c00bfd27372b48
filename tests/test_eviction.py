"""Every eviction method on random inputs and on real SmolLM2 queries, plus capture_queries."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import compaction.registry  # noqa: F401 - registers every method
from compaction.base import REGISTRY, CompactionInput, Target, make_compactor
from compaction.queries import capture_queries, recording_queries
from compaction.scorer import ScorerCompactor
from kvstore.errors import InvalidRequest

METHODS = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, ScorerCompactor))
QUERY_METHODS = {"h2o", "snapkv", "tova"}
SINK_METHODS = {"streaming_llm": 4, "random": 4}
RATIO = 0.3


def test_every_eviction_method_is_registered():
    assert set(METHODS) >= {"streaming_llm", "h2o", "snapkv", "tova", "knorm", "random"}


# ---------------------------------------------------------------------------- inputs
def random_input(tokens: int = 40, heads: int = 3, group: int = 3, dim: int = 8, layers: int = 2, n: int | None = None, seed: int = 0) -> CompactionInput:
    """Keys/values [H, T, D]; queries [H * group, n, D] (n = T: the context's own queries)."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, tokens, dim, generator=g) for _ in range(layers)]
    values = [torch.randn(heads, tokens, dim, generator=g) for _ in range(layers)]
    queries = [2 * torch.randn(heads * group, n or tokens, dim, generator=g) for _ in range(layers)]
    return CompactionInput(keys, values, queries)


@pytest.fixture(scope="module")
def real(smollm2):
    """The first 300 tokens of the GPL-3 through SmolLM2, captured once: (input with the context's
    own queries, captured forward, ids [1, T], per layer the attention output fed to o_proj [1, T, Hq*D])."""
    model, tokenizer = smollm2
    text = (Path(__file__).parent / "data" / "licenses" / "GPL-3").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :300]
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args, i=i: outputs.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        captured = capture_queries(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    keys = [layer.keys[0] for layer in captured.cache.layers]
    values = [layer.values[0] for layer in captured.cache.layers]
    return CompactionInput(keys, values, captured.queries), captured, ids, outputs


@pytest.fixture(params=["random", "random_after_context", pytest.param("real", marks=pytest.mark.slow)])
def inputs(request) -> CompactionInput:
    if request.param == "real":
        return request.getfixturevalue("real")[0]
    return random_input(n=16 if request.param == "random_after_context" else None)


# ---------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("method", METHODS)
def test_shapes_counts_order_and_kept_keys(method, inputs):
    target = Target(ratio=RATIO)
    kept = target.tokens(inputs.num_tokens)
    result = make_compactor(method).compact(inputs, target)
    assert result.method == method and len(result.layers) == inputs.num_layers
    assert result.kept.shape == (inputs.num_layers, inputs.num_heads) and bool((result.kept == kept).all())
    for layer, compacted in enumerate(result.layers):
        assert compacted.keys.shape == compacted.values.shape == (inputs.num_heads, kept, inputs.head_dim)
        assert compacted.bias is None
        idx = compacted.indices  # [H, t]
        assert idx.shape == (inputs.num_heads, kept)
        assert int(idx.min()) >= 0 and int(idx.max()) < inputs.num_tokens
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be sorted and distinct"
        gather = idx.unsqueeze(-1).expand(-1, -1, inputs.head_dim)
        assert torch.equal(compacted.keys, inputs.keys[layer].gather(1, gather))
        assert torch.equal(compacted.values, inputs.values[layer].gather(1, gather))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method, inputs):
    a = make_compactor(method).compact(inputs, Target(ratio=RATIO))
    b = make_compactor(method).compact(inputs, Target(ratio=RATIO))
    assert all(torch.equal(x.indices, y.indices) for x, y in zip(a.layers, b.layers))


@pytest.mark.parametrize("method", sorted(SINK_METHODS))
def test_sinks_kept_in_every_head_and_layer(method, inputs):
    sinks = SINK_METHODS[method]
    assert make_compactor(method).sinks == sinks
    result = make_compactor(method).compact(inputs, Target(ratio=RATIO))
    for compacted in result.layers:
        assert torch.equal(compacted.indices[:, :sinks], torch.arange(sinks).expand(inputs.num_heads, -1))


@pytest.mark.parametrize("method", METHODS)
def test_ratio_one_keeps_everything(method):
    inputs = random_input()
    result = make_compactor(method).compact(inputs, Target(ratio=1.0))
    assert all(torch.equal(c.indices, torch.arange(inputs.num_tokens).expand(inputs.num_heads, -1)) for c in result.layers)


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("method", METHODS)
def test_bad_targets(method):
    inputs = random_input()
    with pytest.raises(InvalidRequest):
        Target(ratio=0.0)
    with pytest.raises(InvalidRequest):
        Target(ratio=1.5)
    with pytest.raises(InvalidRequest, match="larger than the session"):
        make_compactor(method).compact(inputs, Target(budget=inputs.num_tokens + 1))


def test_unknown_method_and_bad_options():
    with pytest.raises(InvalidRequest, match="unknown compaction method 'nope'.*snapkv"):
        make_compactor("nope")
    with pytest.raises(InvalidRequest, match="bad options"):
        make_compactor("knorm", window=3)
    with pytest.raises(InvalidRequest, match="odd kernel"):
        make_compactor("snapkv", kernel=4)
    with pytest.raises(InvalidRequest, match="sinks"):
        make_compactor("streaming_llm", sinks=-1)


@pytest.mark.parametrize("method", METHODS)
def test_missing_or_too_few_queries(method):
    full = random_input()
    no_queries = CompactionInput(full.keys, full.values)
    empty = CompactionInput(full.keys, full.values, [q[:, :0] for q in full.queries])
    for inputs in (no_queries, empty):
        if method in QUERY_METHODS:
            with pytest.raises(InvalidRequest, match=f"{method} needs"):
                make_compactor(method).compact(inputs, Target(ratio=0.5))
        else:
            assert make_compactor(method).compact(inputs, Target(ratio=0.5)).slots == 20


def test_nan_queries_rejected():
    full = random_input()
    queries = [q.clone() for q in full.queries]
    queries[1][4, 7, 2] = float("nan")
    with pytest.raises(InvalidRequest, match="NaN"):
        CompactionInput(full.keys, full.values, queries)


# ---------------------------------------------------------------------------- the rules
def _brute_attention(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [n, D], k [T, D] -> [n, T], one query at a time."""
    rows = []
    for i in range(q.shape[0]):
        keys = k[: i + 1] if causal else k
        p = torch.softmax((keys @ q[i]) / math.sqrt(q.shape[1]), dim=0)
        rows.append(torch.cat([p, p.new_zeros(k.shape[0] - keys.shape[0])]))
    return torch.stack(rows)


@pytest.mark.parametrize("n", [40, 16])
def test_h2o_is_accumulated_attention_with_causal_mask(n):
    inputs = random_input(n=n)
    causal = n == inputs.num_tokens
    score = make_compactor("h2o", chunk=7).score(inputs, 1)
    q = inputs.queries[1]
    for h in range(inputs.num_heads):
        expected = sum(_brute_attention(q[h * 3 + j], inputs.keys[1][h], causal).sum(0) for j in range(3))
        torch.testing.assert_close(score[h], expected, rtol=1e-5, atol=1e-5)


def test_tova_is_last_query_attention_averaged_over_the_group():
    inputs = random_input()
    score = make_compactor("tova").score(inputs, 0)
    for h in range(inputs.num_heads):
        expected = torch.stack([_brute_attention(inputs.queries[0][h * 3 + j, -1:], inputs.keys[0][h], False)[0] for j in range(3)]).mean(0)
        torch.testing.assert_close(score[h], expected)


def test_snapkv_window_keys_always_kept_and_pooling_applied():
    inputs = random_input(tokens=120)
    snap = make_compactor("snapkv", window=16)
    result = snap.compact(inputs, Target(budget=30))
    for compacted in result.layers:
        assert bool((compacted.indices[:, -16:] == torch.arange(104, 120)).all())
    # the scored part: window attention, mean over window, avg-pool (kernel 5, zero padding counted), mean over group
    q, k = inputs.queries[0], inputs.keys[0]
    h = 2
    attn = torch.stack([_brute_attention(q[h * 3 + j], k[h], True)[-16:, :104].mean(0) for j in range(3)])  # [g, 104]
    padded = torch.nn.functional.pad(attn, (2, 2))
    pooled = torch.stack([padded[:, i : i + 5].sum(1) / 5 for i in range(104)], 1).mean(0)
    torch.testing.assert_close(snap.score(inputs, 0)[h, :104], pooled)


def test_streaming_llm_keeps_sinks_and_the_most_recent():
    inputs = random_input(tokens=50)
    result = make_compactor("streaming_llm").compact(inputs, Target(budget=20))
    expected = torch.cat([torch.arange(4), torch.arange(34, 50)])
    assert all(bool((c.indices == expected).all()) for c in result.layers)


def test_knorm_keeps_the_smallest_keys():
    inputs = random_input()
    result = make_compactor("knorm").compact(inputs, Target(budget=10))
    norms = inputs.keys[0].norm(dim=-1)  # [H, T]
    for h in range(inputs.num_heads):
        assert set(result.layers[0].indices[h].tolist()) == set(norms[h].argsort()[:10].tolist())


def test_random_depends_on_the_seed():
    inputs = random_input(tokens=200)
    a = make_compactor("random", seed=1).compact(inputs, Target(ratio=0.5))
    b = make_compactor("random", seed=2).compact(inputs, Target(ratio=0.5))
    assert not torch.equal(a.layers[0].indices, b.layers[0].indices)
    assert not torch.equal(a.layers[0].indices, a.layers[1].indices)  # layers draw differently


# ---------------------------------------------------------------------------- capture_queries
@pytest.mark.slow
def test_captured_queries_reproduce_the_attention(smollm2, real):
    """softmax(Q K^T / sqrt(D) + causal) V with the captured Q and the cached K, V equals the
    attention output the model feeds into o_proj, in every layer; the logits are the model's."""
    model, _ = smollm2
    _, captured, ids, outputs = real
    with torch.no_grad():
        plain = model(ids[:, :64]).logits
    torch.testing.assert_close(captured.logits[:, :64], plain, rtol=1e-4, atol=1e-4)
    config = model.config
    total = ids.shape[1]
    future = torch.ones(total, total, dtype=torch.bool).triu(1)
    assert len(captured.queries) == len(outputs) == config.num_hidden_layers
    for i, q in enumerate(captured.queries):
        assert q.shape == (config.num_attention_heads, total, config.head_dim)
        k, v = captured.cache.layers[i].keys[0], captured.cache.layers[i].values[0]  # [H, T, D]
        assert k.shape == (config.num_key_value_heads, total, config.head_dim)
        group = q.shape[0] // k.shape[0]
        logits = (q @ k.repeat_interleave(group, 0).transpose(1, 2)) / math.sqrt(q.shape[-1])
        out = logits.masked_fill(future, float("-inf")).softmax(-1) @ v.repeat_interleave(group, 0)  # [Hq, T, D]
        expected = outputs[i][0].view(total, q.shape[0], q.shape[2]).transpose(0, 1)
        assert (out - expected).abs().max().item() < 1e-4, f"layer {i}"


@pytest.mark.slow
def test_capture_restores_the_attention_implementation(smollm2):
    model, _ = smollm2
    original = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with recording_queries(model):
            assert model.config._attn_implementation == "kvmem_capture"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == original
    assert all(layer.self_attn.config._attn_implementation == original for layer in model.model.layers)


@pytest.mark.slow
def test_capture_under_eager_matches_sdpa(smollm2, real):
    model, _ = smollm2
    _, captured, ids, _ = real
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager = capture_queries(model, ids[:, :64])
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation(original)
    for a, b in zip(eager.queries, captured.queries):
        torch.testing.assert_close(a, b[:, :64], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eager.logits, captured.logits[:, :64], rtol=1e-3, atol=1e-3)
