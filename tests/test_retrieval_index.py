"""Block index, probes, budget spread, selection and layout: the parts that need no model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.errors import CorruptData, InvalidRequest
from retrieval.actqkv import BudgetSpread, Probe, normalised_entropy, token_weights
from retrieval.block_index import BlockIndex, BlockIndexConfig, block_ranges, representatives
from retrieval.context import Layout, RetrievalConfig, SessionKV, select
from retrieval.rope import Rope

ROPE = Rope(1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)))  # head dim 16


def _keys(layers=3, heads=2, tokens=300, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, tokens, dim, generator=g) for _ in range(layers)]


def test_rope_rotations_compose_and_invert():
    x = torch.randn(2, 5, 16)
    a, b = torch.tensor([3, 70, 9000, 0, 123456]), torch.tensor([-3, 5, -8000, 7, -123000])
    assert torch.allclose(ROPE.rotate(ROPE.rotate(x, a), b), ROPE.rotate(x, a + b), atol=1e-4)
    assert torch.allclose(ROPE.rotate(ROPE.rotate(x, a), -a), x, atol=1e-5)
    assert torch.equal(ROPE.rotate(x, 0), x)
    # a rotation keeps norms and relative dot products depend only on the distance
    q, k = torch.randn(16), torch.randn(16)
    d1 = ROPE.rotate(q.view(1, 1, 16), 50).flatten() @ ROPE.rotate(k.view(1, 1, 16), 20).flatten()
    d2 = ROPE.rotate(q.view(1, 1, 16), 1050).flatten() @ ROPE.rotate(k.view(1, 1, 16), 1020).flatten()
    assert torch.allclose(d1, d2, atol=1e-4)


def test_representatives_start_with_the_mean_and_pick_outliers():
    keys = torch.ones(1, 64, 4) + 0.01 * torch.randn(1, 64, 4)
    keys[0, 17] = torch.tensor([-1.0, 2.0, -3.0, 0.5])  # one token unlike the rest
    reps = representatives(keys, 64, 2)  # [H, nb, R, D]
    assert reps.shape == (1, 1, 2, 4)
    assert torch.allclose(reps.norm(dim=-1), torch.ones(1, 1, 2))
    assert torch.allclose(reps[0, 0, 1], torch.nn.functional.normalize(keys[0, 17], dim=0))


def test_block_ranges_cover_the_session():
    ranges = block_ranges(300, 64)
    assert ranges.tolist()[-1] == [256, 300] and ranges[0, 0] == 0
    assert (ranges[1:, 0] == ranges[:-1, 1]).all()


def test_search_finds_the_block_holding_the_probe_and_matches_brute_force():
    keys = _keys()
    positions = torch.arange(300)
    target = torch.randn(2, 16) * 4
    keys[1][:, 128:160] = torch.randn(2, 1, 16) + 0.05 * torch.randn(2, 32, 16)  # a block of near-identical keys...
    keys[1][:, 150] = ROPE.rotate(target[:, None, :], 150)[:, 0]  # ...and one that stands out, stored post-RoPE at position 150
    index = BlockIndex.build(keys, positions, ROPE, BlockIndexConfig(block_tokens=32, representatives=4))
    ids, scores = index.search(1, target, 3)
    assert ids[0] == 150 // 32  # the outlier is one of the block's representatives
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and (np.diff(scores) <= 1e-6).all()
    # exact scores: best representative cosine per head, averaged over heads
    reps = representatives(ROPE.rotate(keys[1], -positions), 32, 4)
    brute = torch.einsum("hd,hnrd->hnr", torch.nn.functional.normalize(target, dim=-1), reps).amax(-1).mean(0)
    assert np.allclose(index.block_scores(1, target), brute.numpy(), atol=1e-5)


def test_index_bytes_roundtrip_and_damage_is_reported():
    keys = _keys()
    index = BlockIndex.build(keys, torch.arange(300), ROPE, BlockIndexConfig(block_tokens=32))
    raw = [index.layer_to_bytes(l) for l in range(index.num_layers)]
    again = BlockIndex.from_layer_bytes(raw)
    probe_vec = torch.randn(2, 16)
    for layer in range(3):
        a, b = index.search(layer, probe_vec, 5), again.search(layer, probe_vec, 5)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for broken in ([raw[0][:-10]] + raw[1:], [b"garbage" * 10] + raw[1:], [raw[1], raw[0], raw[2]], []):
        with pytest.raises(CorruptData):
            BlockIndex.from_layer_bytes(broken)


def test_every_key_index_scores_the_exact_weighted_best_match():
    keys = _keys(tokens=200)
    positions = torch.arange(200)
    index = BlockIndex.build(keys, positions, ROPE, BlockIndexConfig(block_tokens=32))  # every key
    vectors, weights = torch.randn(2, 3, 16), torch.tensor([0.6, 0.3, 0.1])
    unit = torch.nn.functional.normalize(ROPE.rotate(keys[2], -positions), dim=-1)  # [H, T, D]
    sims = torch.einsum("hnd,htd->hnt", torch.nn.functional.normalize(vectors, dim=-1), unit)
    best = torch.stack([sims[..., a:b].amax(-1) for a, b in block_ranges(200, 32)], -1)  # [H, n, nb]
    expected = torch.einsum("n,hnb->b", weights, best) / 2
    assert np.allclose(index.block_scores(2, vectors, weights), expected.numpy(), atol=1e-5)


def test_search_rejects_bad_probes():
    index = BlockIndex.build(_keys(), torch.arange(300), ROPE)
    with pytest.raises(InvalidRequest, match="probe shape"):
        index.search(0, torch.randn(3, 16), 4)
    with pytest.raises(InvalidRequest, match="layer"):
        index.search(7, torch.randn(2, 16), 4)


def test_token_weights_follow_the_method():
    queries = torch.randn(4, 10, 16) * 0.1
    queries[:, 6] += 5.0  # token 6 deviates from the window's statistics
    act = token_weights(queries, "actqkv")
    assert act.sum() == pytest.approx(1.0) and int(act.argmax()) == 6 and act[6] > 0.5
    assert torch.allclose(token_weights(queries, "mean"), torch.full((10,), 0.1))
    assert token_weights(queries, "last").tolist() == [0.0] * 9 + [1.0]
    with pytest.raises(InvalidRequest):
        token_weights(queries, "psychic")
    pooled = Probe.from_states(queries, 2, "mean")
    assert pooled.vectors.shape == (2, 10, 16) and torch.allclose(pooled.vectors[0], queries[:2].mean(0))
    assert Probe.from_states(queries, 2, "last").vectors.shape == (2, 1, 16)  # zero-weight tokens dropped


def test_budget_spread_follows_entropy_within_bounds():
    spread = BudgetSpread(min_share=0.25, max_share=2.0)
    entropies = [0.1, 0.9, 0.5, 0.5]
    blocks = spread.spread(entropies, total_blocks=40, available=100)
    assert sum(blocks) == 40
    assert blocks[1] > blocks[2] >= blocks[3] > blocks[0]
    assert min(blocks) >= int(0.25 * 10) and max(blocks) <= 20
    assert spread.spread([0.5] * 3, 30, 4) == [4, 4, 4]  # capped by what a layer can retrieve
    assert normalised_entropy(np.zeros(10), 0.05) == pytest.approx(1.0)
    assert normalised_entropy(np.array([1.0] + [0.0] * 9), 0.01) < 0.01


def _selection_setup(tokens=1000, budget=300):
    keys = _keys(tokens=tokens)
    kv = SessionKV(keys, [k.clone() for k in keys], torch.arange(tokens))
    index = BlockIndex.build(keys, kv.positions, ROPE, BlockIndexConfig(block_tokens=32))
    config = RetrievalConfig(budget_tokens=budget, sink_tokens=4, recent_tokens=64)
    probes = [Probe(torch.randn(2, 3, 16), torch.tensor([0.5, 0.3, 0.2])) for _ in range(3)]
    return kv, index, config, probes


def test_selection_keeps_sinks_and_recent_and_spends_the_budget():
    kv, index, config, probes = _selection_setup()
    selection = select(index, probes, config)
    per_layer = selection.tokens_per_layer
    assert abs(np.mean(per_layer) - config.budget_tokens) <= index.config.block_tokens
    for layer in selection.layers:
        assert set(range(4)) <= set(layer.tokens.tolist()) and set(range(1000 - 64, 1000)) <= set(layer.tokens.tolist())
        assert len(np.unique(layer.tokens)) == len(layer.tokens) and (np.diff(layer.tokens) > 0).all()
        # no retrieved block overlaps the sinks or the recent window
        assert all(index.blocks[b, 0] >= 4 and index.blocks[b, 1] <= 1000 - 64 for b in layer.blocks)
    static = select(index, probes, RetrievalConfig(budget_tokens=300, sink_tokens=4, recent_tokens=64, dynamic=False))
    assert len(set(static.tokens_per_layer)) == 1


def test_selection_refuses_budgets_beyond_the_session():
    _, index, _, probes = _selection_setup()
    with pytest.raises(InvalidRequest, match="exceeds the session"):
        select(index, probes, RetrievalConfig(budget_tokens=1001))
    with pytest.raises(InvalidRequest, match="positive"):
        RetrievalConfig(budget_tokens=0)


def test_packed_layout_keeps_order_and_stays_inside_the_window():
    kv, index, config, probes = _selection_setup(tokens=20000, budget=1000)
    selection = select(index, probes, config)
    layout = Layout.plan(kv, selection, extra_tokens=40, window=2048)
    assert not layout.original
    for layer in selection.layers:
        positions = layout.positions(kv, layer.tokens)
        assert (torch.diff(positions) > 0).all()  # original order kept
        assert int(positions.max()) < layout.question_start <= 2048 - 40
        recent = torch.from_numpy(layer.tokens) >= selection.recent_start
        assert torch.equal(torch.diff(positions[recent]), torch.ones(int(recent.sum()) - 1, dtype=torch.int64))
    with pytest.raises(InvalidRequest, match="window"):
        Layout.plan(kv, selection, extra_tokens=40, window=600)
    fits = Layout.plan(kv, selection, extra_tokens=40, window=32768, packed=False)
    assert fits.original and fits.question_start == 20000


@pytest.mark.parametrize("budget", [100, 300, 517])
def test_reported_block_spans_cover_every_retrieved_token_margins_included(budget):
    """What the Retrieve RPC reports per layer (retrieval.context.ranked_spans) holds every token
    the selection gives the answer outside the sinks and the recent window, and no token it does
    not give (a needle in a block's margin used to be missing from the RPC's blocks)."""
    from retrieval.context import ranked_spans

    kv, index, _, probes = _selection_setup()
    config = RetrievalConfig(budget_tokens=budget, sink_tokens=4, recent_tokens=64, margin_tokens=24)
    selection = select(index, probes, config)
    for layer in selection.layers:
        order, spans = ranked_spans(layer)
        assert (np.diff(layer.scores[order]) <= 0).all()  # best first
        for block, (start, end) in zip(layer.blocks[order], spans):  # each range is its block and margins at most
            core_start, core_end = index.blocks[block]
            assert core_start - config.margin_tokens <= start < end <= core_end + config.margin_tokens
        covered = set()
        for start, end in spans:
            covered.update(range(start, end))
        middle = {t for t in layer.tokens.tolist() if selection.sink_end <= t < selection.recent_start}
        assert middle <= covered
        assert covered <= set(layer.tokens.tolist())
        assert len(spans) == len(layer.blocks)
