"""The batched exact search (retrieval/flat_search.py) and the shared widening walk select the
same blocks and tokens as the reference: faiss's own exhaustive search, per-layer widening."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.actqkv import Probe
from retrieval.block_index import BlockIndex, BlockIndexConfig
from retrieval.context import RetrievalConfig, always_kept, select
from retrieval.flat_search import top_blocks
from retrieval.rope import Rope

ROPE = Rope(1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)))  # head dim 16


def _index(tokens=5000, layers=4, heads=3, dim=16, representatives=4, seed=0) -> BlockIndex:
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, tokens, dim, generator=g) for _ in range(layers)]
    return BlockIndex.build(keys, torch.arange(tokens), ROPE, BlockIndexConfig(block_tokens=32, representatives=representatives))


def _faiss_search(index: BlockIndex, layer: int, vectors: torch.Tensor, weights: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: every vector's cosine from faiss's own exhaustive search, best per block, weighted, mean over heads."""
    query = torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()
    per_block = index.config.per_block
    scores = np.zeros(index.num_blocks, dtype=np.float64)
    for head, faiss_index in enumerate(index.indexes[layer]):
        sims, ids = faiss_index.search(np.ascontiguousarray(query[head]), faiss_index.ntotal)  # [n, N]
        for i in range(query.shape[1]):
            best = np.full(index.num_blocks, -np.inf)
            np.maximum.at(best, ids[i] // per_block, sims[i])
            scores += float(weights[i]) * best
    scores /= index.num_heads
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


@pytest.mark.parametrize("representatives", [4, 0])
def test_search_layers_equals_faiss_exhaustive_search(representatives):
    index = _index(representatives=representatives)
    g = torch.Generator().manual_seed(1)
    probes = []
    for layer in range(index.num_layers):  # probes of different lengths per layer
        n = 1 + layer % 3
        probes.append((torch.randn(3, n, 16, generator=g) * 3, torch.softmax(torch.randn(n, generator=g), 0)))
    got = index.search_layers(probes, 40)
    for layer, ((vectors, weights), (ids, scores)) in enumerate(zip(probes, got)):
        want_ids, want_scores = _faiss_search(index, layer, vectors, weights, 40)
        assert np.array_equal(ids, want_ids)
        assert np.allclose(scores, want_scores, atol=1e-5)
        one_ids, one_scores = index.search(layer, vectors, 40, weights)  # the per-layer search agrees exactly
        assert np.array_equal(ids, one_ids) and np.array_equal(scores, one_scores)


def test_top_blocks_ranks_as_a_stable_full_sort_ties_included():
    rng = np.random.default_rng(0)
    for k in (1, 5, 37, 100, 120):
        scores = rng.integers(0, 6, size=100).astype(np.float32)  # many ties
        ids, top = top_blocks(scores, k)
        want = np.argsort(-scores, kind="stable")[:k]
        assert np.array_equal(ids, want) and np.array_equal(top, scores[want])


def _reference_widened(index, ranked_ids, budget, margin, lo, hi):
    """The per-layer widening as select did it before layers shared one walk."""
    mask = np.zeros(index.num_tokens, dtype=bool)
    chosen, spans, remaining = [], {}, budget
    for block in ranked_ids:
        if remaining <= 0:
            break
        start, end = (int(x) for x in index.blocks[block])
        core = np.arange(max(lo, start), min(hi, end))
        left = np.arange(max(lo, start) - 1, max(lo, start - margin) - 1, -1)
        right = np.arange(min(hi, end), min(hi, end + margin))
        margins = np.concatenate([left, right])[np.argsort(np.concatenate([np.arange(len(left)), np.arange(len(right))]), kind="stable")]
        take = np.concatenate([core[~mask[core]], margins[~mask[margins]]])[:remaining]
        if len(take) == 0:
            continue
        mask[take] = True
        remaining -= len(take)
        chosen.append(int(block))
        spans[int(block)] = (int(take.min()), int(take.max()) + 1)
    ordered = np.sort(np.asarray(chosen, dtype=np.int64))
    return ordered, mask, np.asarray([spans[int(b)] for b in ordered], dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("shared,dynamic", [(True, True), (False, True), (True, False)])
def test_selection_tokens_equal_per_layer_widening(shared, dynamic, monkeypatch):
    import retrieval.context as context

    walked = []  # the rankings select walks (shared: one for every layer)
    real = context._widening_steps
    monkeypatch.setattr(context, "_widening_steps", lambda index, ids, *rest: walked.append(ids) or real(index, ids, *rest))
    index = _index(tokens=6000, layers=5)
    g = torch.Generator().manual_seed(2)
    probes = [Probe.from_states(torch.randn(6, 4, 16, generator=g), 3, "actqkv") for _ in range(index.num_layers)]
    config = RetrievalConfig(budget_tokens=700, sink_tokens=4, recent_tokens=64, margin_tokens=24, shared=shared, dynamic=dynamic)
    selection = select(index, probes, config)
    sink_end, recent_start, fixed = always_kept(index.num_tokens, config)
    assert len(walked) == (1 if shared else index.num_layers)
    for layer, chosen_layer in enumerate(selection.layers):
        ids = walked[0 if shared else layer]
        chosen, mask, spans = _reference_widened(index, ids, len(chosen_layer.tokens) - len(fixed), 24, sink_end, recent_start)
        assert np.array_equal(chosen, chosen_layer.blocks) and np.array_equal(spans, chosen_layer.spans)
        assert np.array_equal(np.sort(np.concatenate([fixed, np.nonzero(mask)[0]])), chosen_layer.tokens)
    if dynamic:
        assert len(set(selection.tokens_per_layer)) > 1  # layers went to different depths


@pytest.mark.parametrize("method", ["actqkv", "mean", "last"])
def test_probes_for_all_layers_at_once_equal_layer_by_layer(method):
    from retrieval.actqkv import probes_for_layers

    g = torch.Generator().manual_seed(3)
    for n in (1, 8):
        states = [torch.randn(9, n, 64, generator=g) * 3 for _ in range(6)]
        for one, many in zip([Probe.from_states(s, 3, method) for s in states], probes_for_layers(states, 3, method)):
            assert torch.equal(one.vectors, many.vectors) and torch.equal(one.weights, many.weights)


def test_the_accelerator_path_selects_the_same_blocks():
    """DeviceVectors (used on CUDA) run here on the CPU: same blocks, scores to float rounding."""
    from retrieval.flat_search import DeviceVectors, search_layers

    index = _index()
    g = torch.Generator().manual_seed(4)
    probes = [(torch.randn(3, 1 + layer % 3, 16, generator=g), torch.softmax(torch.randn(1 + layer % 3, generator=g), 0)) for layer in range(index.num_layers)]
    flat = [index._flat_vectors(layer) for layer in range(index.num_layers)]
    on_device = search_layers(flat, probes, 40, index.config.per_block, DeviceVectors(torch.device("cpu")))
    for (ids, scores), (want_ids, want_scores) in zip(on_device, index.search_layers(probes, 40)):
        assert np.array_equal(ids, want_ids) and np.allclose(scores, want_scores, atol=1e-6)


def _with_coarse_scan(index: BlockIndex, min_vectors: int = 0) -> BlockIndex:
    """The same indexes with the int8 first scan from ``min_vectors`` vectors per head (0: every layer)."""
    return BlockIndex(index.config, index.num_tokens, index.head_dim, index.indexes, coarse_min_vectors=min_vectors, coarse_min_ratio=4)


def _outlier_keys(tokens, layers, heads, dim, seed):
    """Keys shaped like a transformer's: a few dimensions tens of times larger than the rest, and
    long runs of similar tokens (so many blocks score alike)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(dim)
    scale[torch.randperm(dim, generator=g)[:3]] = 30.0
    keys = []
    for _ in range(layers):
        topics = torch.randn(heads, 8, dim, generator=g)
        which = torch.arange(tokens) * 8 // tokens  # eight topics in long runs
        keys.append((topics[:, which] + 0.3 * torch.randn(heads, tokens, dim, generator=g)) * scale)
    return keys


@pytest.mark.parametrize("representatives,structured", [(4, False), (0, False), (4, True), (0, True)])
def test_the_int8_first_scan_selects_what_the_exact_scan_selects(representatives, structured, monkeypatch):
    """Every layer through the int8 scan and the exact rerank: the exact scan's blocks in its
    order, and its scores, for independent, correlated and single probes, uniform and peaked
    weights, and shortlists from one block to a 16th of them (the most it is used for)."""
    tokens, layers, dim = 12000, 4, 16
    if structured:
        keys = _outlier_keys(tokens, layers, 3, dim, seed=5)
        index = BlockIndex.build(keys, torch.arange(tokens), ROPE, BlockIndexConfig(block_tokens=32, representatives=representatives))
    else:
        index = _index(tokens=tokens, layers=layers, representatives=representatives)
    coarse = _with_coarse_scan(index)
    import retrieval.flat_search as flat_search

    rescored = []  # blocks the exact rerank scored, per layer searched through the int8 scan
    real = flat_search.layer_scores
    monkeypatch.setattr(flat_search, "layer_scores", lambda vectors, *rest: rescored.append(len(vectors[0]) // index.config.per_block) or real(vectors, *rest))
    g = torch.Generator().manual_seed(6)
    checked = 0
    for trial in range(6):
        n = (1, 5, 24)[trial % 3]
        if trial >= 3:  # probes close to one another: their rounding errors add up instead of cancelling
            vectors = [torch.randn(3, 1, dim, generator=g) + 0.2 * torch.randn(3, n, dim, generator=g) for _ in range(layers)]
        else:
            vectors = [torch.randn(3, n, dim, generator=g) * 3 for _ in range(layers)]
        weights = torch.softmax(torch.randn(n, generator=g) * (3 if trial % 2 else 0.1), 0)
        probes = [(v, weights) for v in vectors]
        for k in (1, 5, index.num_blocks // 16):
            want = index.search_layers(probes, k)
            got = coarse.search_layers(probes, k)
            for (ids, scores), (want_ids, want_scores) in zip(got, want):
                assert np.array_equal(ids, want_ids)
                assert np.allclose(scores, want_scores, atol=1e-6)
                checked += 1
            one_ids, one_scores = coarse.search(2, vectors[2], k, weights)  # the per-layer search takes the same path
            assert np.array_equal(one_ids, got[2][0]) and np.array_equal(one_scores, got[2][1])
    assert checked == 6 * 3 * layers
    assert coarse._coarse.nbytes > 0  # the first scan did run
    reranked = [count for count in rescored if count < index.num_blocks]
    assert len(reranked) >= len(rescored) // 2 and np.median(reranked) < index.num_blocks / 2  # and it left most blocks out


def test_the_int8_first_scan_keeps_ties_in_the_exact_order():
    """Blocks with identical keys tie exactly: the lower id comes first, as in the exact scan."""
    g = torch.Generator().manual_seed(7)
    block = torch.randn(3, 32, 16, generator=g)
    others = torch.randn(3, 32 * 60, 16, generator=g)
    keys = torch.cat([others[:, :320], block, others[:, 320:640], block, others[:, 640:], block], dim=1)  # the same block 3 times
    index = BlockIndex.build([keys], torch.zeros(keys.shape[1], dtype=torch.int64), ROPE, BlockIndexConfig(block_tokens=32, representatives=0))
    coarse = _with_coarse_scan(index)
    probe = block[:, :4]  # four of the repeated block's keys: a cosine of 1 in each copy
    want_ids, want_scores = index.search(0, probe, 3)
    ids, scores = coarse.search(0, probe, 3)
    assert np.array_equal(ids, want_ids) and np.array_equal(ids, [10, 21, 62])
    assert scores[0] == scores[1] == scores[2]


def test_the_int8_codes_are_counted_in_the_index_bytes_and_made_ahead():
    index = _index(tokens=6000, layers=2)
    exact = _with_coarse_scan(index, min_vectors=1 << 30)
    coarse = _with_coarse_scan(index).prepare_search()
    vectors = index.num_blocks * index.config.per_block
    assert coarse.nbytes - exact.nbytes == 2 * 3 * (vectors * 16 + 16 * 4)  # per layer and head: int8 codes and a step per dimension
    assert coarse._coarse.nbytes == coarse.nbytes - exact.nbytes  # prepare_search made them all
    assert exact.prepare_search()._coarse.nbytes == 0
