"""Recall's pure parts (no model): the double-count handling on synthetic caches where the exact
answer is known, slot-index records, and reading only the chunks that hold the chosen tokens."""
import numpy as np
import pytest
import torch

from compaction.slots import slots_from_bytes, slots_to_bytes
from kvstore import errors
from retrieval.reads import read_tokens
from retrieval.recall import RecallConfig, adjusted_bias
from tests.conftest import TOY_SPEC, random_layers


def attention(query, keys, values, bias):
    """Output and total mass exp(q.k + b) of one head: query [D], keys/values [n, D], bias [n]."""
    logits = keys @ query + bias
    weights = torch.exp(logits)
    return (weights[:, None] * values).sum(0) / weights.sum(), weights.sum()


def grouped_context(groups=5, copies=4, dim=8, seed=0):
    """A context of ``groups`` distinct keys, each repeated ``copies`` times (same value), and its
    mass-exact compaction: one slot per group with bias log(copies) (what Attention Matching fits
    for exact duplicates). Returns keys [T, D], values [T, D], slot keys/values [g, D], slot bias
    [g], slot indices [g] (the first copy of each group)."""
    generator = torch.Generator().manual_seed(seed)
    base_k = torch.randn(groups, dim, generator=generator)
    base_v = torch.randn(groups, dim, generator=generator)
    keys, values = base_k.repeat_interleave(copies, 0), base_v.repeat_interleave(copies, 0)
    indices = torch.arange(groups) * copies
    return keys, values, base_k, base_v, torch.full((groups,), float(np.log(copies))), indices


@pytest.mark.parametrize("handling", ["drop", "drop_scale"])
def test_recalling_a_whole_group_keeps_the_full_cache_attention_mass(handling):
    keys, values, slot_k, slot_v, slot_b, slot_i = grouped_context()
    total = keys.shape[0]
    recalled = np.arange(8, 12)  # group 2, all four copies, exact
    bias = adjusted_bias(slot_b[None], slot_i[None], recalled, total, handling)[0]
    combined_k = torch.cat([slot_k, keys[recalled]])
    combined_v = torch.cat([slot_v, values[recalled]])
    combined_b = torch.cat([bias, torch.zeros(len(recalled))])
    for seed in range(5):
        query = torch.randn(keys.shape[1], generator=torch.Generator().manual_seed(100 + seed))
        full_out, full_mass = attention(query, keys, values, torch.zeros(total))
        out, mass = attention(query, combined_k, combined_v, combined_b)
        assert torch.allclose(mass, full_mass, rtol=1e-5), (handling, float(mass), float(full_mass))
        assert torch.allclose(out, full_out, atol=1e-5)


def test_without_handling_the_recalled_mass_counts_twice():
    keys, values, slot_k, slot_v, slot_b, slot_i = grouped_context()
    recalled = np.arange(8, 12)
    bias = adjusted_bias(slot_b[None], slot_i[None], recalled, keys.shape[0], "none")[0]
    query = torch.randn(keys.shape[1], generator=torch.Generator().manual_seed(7))
    _, full_mass = attention(query, keys, values, torch.zeros(keys.shape[0]))
    _, mass = attention(query, torch.cat([slot_k, keys[recalled]]), torch.cat([slot_v, values[recalled]]), torch.cat([bias, torch.zeros(4)]))
    double = float(torch.exp(keys[8] @ query)) * 4  # group 2's mass, counted by its slot and by the recalled copies
    assert float(mass) == pytest.approx(float(full_mass) + double, rel=1e-5)


def test_eviction_slots_plus_recall_are_exactly_a_subset_of_the_context():
    """Token eviction: slots are original tokens at bias 0; after drop, slots + recalled tokens
    attend exactly like the full cache restricted to their union (no token twice), and drop_scale
    does not shift them (their biases are all zero: nothing stands for more than itself)."""
    generator = torch.Generator().manual_seed(3)
    keys, values = torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator)
    kept = torch.tensor([0, 1, 2, 3, 10, 11, 28, 29, 30, 31])
    recalled = np.arange(8, 16)  # overlaps kept tokens 10, 11
    for handling in ("drop", "drop_scale"):
        bias = adjusted_bias(torch.zeros(1, len(kept)), kept[None], recalled, 32, handling)[0]
        assert torch.isinf(bias[4:6]).all() and (bias[torch.tensor([0, 1, 2, 3, 6, 7, 8, 9])] == 0).all()
        union = np.union1d(kept.numpy(), recalled)
        query = torch.randn(8, generator=generator)
        expected, _ = attention(query, keys[union], values[union], torch.zeros(len(union)))
        out, _ = attention(query, torch.cat([keys[kept], keys[recalled]]), torch.cat([values[kept], values[recalled]]),
                           torch.cat([bias, torch.zeros(len(recalled))]))
        assert torch.allclose(out, expected, atol=1e-6)


def test_scale_assumes_equal_shares_and_padding_stays_masked():
    bias = torch.tensor([[0.5, 1.0, float("-inf")]])
    out = adjusted_bias(bias, torch.tensor([[0, 5, -1]]), np.arange(4), 16, "scale")
    assert torch.allclose(out[0, :2], bias[0, :2] + np.log(12 / 16)) and torch.isinf(out[0, 2])


def test_slot_records_round_trip_and_refuse_another_shape():
    layers = [torch.randint(-1, 100, (2, 7)) for _ in range(3)]
    raw = slots_to_bytes(layers)
    assert all(torch.equal(a, b) for a, b in zip(slots_from_bytes(raw, 3, 2, 7), layers))
    with pytest.raises(errors.CorruptData):
        slots_from_bytes(raw, 3, 2, 8)
    with pytest.raises(errors.CorruptData):
        slots_from_bytes(raw[:-4], 3, 2, 7)


@pytest.mark.parametrize("bad", [dict(budget_tokens=0), dict(budget_tokens=1 << 40), dict(double_count="twice"), dict(margin_tokens=-1),
                                 dict(block_tokens=0), dict(block_tokens=1 << 20), dict(representatives=-1)])
def test_bad_recall_settings_are_invalid(bad):
    with pytest.raises(errors.InvalidRequest):
        RecallConfig(**bad)


def test_server_recall_settings_default_to_recall_s_own_and_are_validated():
    from kvmem.config import ConfigError, PlannerSettings, load_config
    from retrieval.executors import ExecutorSettings

    recall, planner, executor = RecallConfig(), PlannerSettings(), ExecutorSettings()
    for ours, theirs in (("block_tokens", "recall_block_tokens"), ("representatives", "recall_representatives"), ("margin_tokens", "recall_margin_tokens")):
        assert getattr(recall, ours) == getattr(planner, theirs) == getattr(executor, theirs)
    index = RecallConfig(block_tokens=16, representatives=0).index_config()
    assert (index.block_tokens, index.representatives) == (16, 0) and index.tag != RecallConfig(block_tokens=64, representatives=4).index_config().tag
    for bad in ("planner.recall_block_tokens=0", "planner.recall_representatives=-1", "planner.recall_margin_tokens=-2"):
        with pytest.raises(ConfigError, match="recall_"):
            load_config(overrides=[bad])


def test_read_tokens_reads_only_the_chunks_that_hold_them(store):
    layers = random_layers(TOY_SPEC, 300, seed=1)  # chunks of store_config.chunk_tokens tokens
    pieces = store.new_pieces(TOY_SPEC, 0, 300)
    for number, (k, v) in enumerate(layers):
        pieces.add_tensors(number, 0, k, v)
    record = store.save("t", "s", TOY_SPEC, np.arange(300, dtype=np.uint32), pieces).record
    chunk = store.config.chunk_tokens
    assert chunk < 150, "the test needs several chunks"
    tokens = [np.array([3, 4, 5]), np.array([4, 5, 6])] + [np.array([5, 6, 7])] * (TOY_SPEC.num_layers - 2)
    keys, values, read = read_tokens(store, record, tokens)
    for layer, chosen in enumerate(tokens):
        assert torch.equal(keys[layer], layers[layer][0][:, chosen]) and torch.equal(values[layer], layers[layer][1][:, chosen])
    one_chunk = sum(len(b.data) for b in store.load_chunk(record, record.blocks[0]))
    assert read == one_chunk  # every chosen token is in the first chunk: nothing else was read
    far = [np.array([3, chunk + 1])] * TOY_SPEC.num_layers
    _, _, read_two = read_tokens(store, record, far)
    assert read_two == one_chunk + sum(len(b.data) for b in store.load_chunk(record, record.blocks[1]))
