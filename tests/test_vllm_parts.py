"""The vLLM connector's parts that need no engine: the paged-layout conversion, the scheduler's
load/save rules, the settings, and the client calls the connector relies on (real server)."""
from __future__ import annotations

import random

import pytest
import torch

from kvstore.errors import Conflict, NotFound
from kvmem.vllm.layout import PagedLayout
from kvmem.vllm.plan import RequestState, loadable_tokens
from kvmem.vllm.settings import ConnectorSettings
from tests.conftest import TOY_SPEC, random_layers

H, D, BS = 3, 8, 16


def paged_buffer(kind: str, num_blocks: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (num_blocks, H, BS, 2 * D) if kind == "cpu" else (2, num_blocks, BS, H, D)
    return torch.randn(shape, generator=generator)


def cpu_slot_keys(kv, block, offset):
    return kv.view(-1, H, 2, BS, D)[block, :, 0, offset]


@pytest.mark.parametrize("kind", ["cpu", "flash"])
def test_gather_reads_each_token_from_its_block_and_offset(kind):
    kv = paged_buffer(kind, 12)
    layout = PagedLayout.detect(kv, BS, H, D)
    assert layout.kind == kind
    block_ids = [7, 2, 11, 0, 5]
    for start, end in [(0, 80), (5, 37), (16, 32), (31, 33), (79, 80)]:
        keys, values = layout.gather(kv, block_ids, start, end)
        assert keys.shape == values.shape == (H, end - start, D)
        for i, token in enumerate(range(start, end)):
            block, offset = block_ids[token // BS], token % BS
            if kind == "cpu":
                want_keys, want_values = cpu_slot_keys(kv, block, offset), kv.view(-1, H, 2, BS, D)[block, :, 1, offset]
            else:
                want_keys, want_values = kv[0, block, offset], kv[1, block, offset]
            assert torch.equal(keys[:, i], want_keys) and torch.equal(values[:, i], want_values)
        assert keys.is_contiguous() and keys.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["cpu", "flash"])
def test_scatter_writes_only_the_named_slots_and_gather_reads_them_back(kind):
    kv = paged_buffer(kind, 10, seed=1)
    before = kv.clone()
    layout = PagedLayout.detect(kv, BS, H, D)
    block_ids = [9, 4, 6]
    keys, values = torch.randn(H, 27, D), torch.randn(H, 27, D)
    layout.scatter(kv, block_ids, 10, keys, values)  # tokens [10, 37): the end of block 9, all of 4, the start of 6
    got_keys, got_values = layout.gather(kv, block_ids, 10, 37)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    untouched = [b for b in range(10) if b not in block_ids]
    if kind == "cpu":
        assert torch.equal(kv[untouched], before[untouched])
        assert torch.equal(kv.view(-1, H, 2, BS, D)[9, :, :, :10], before.view(-1, H, 2, BS, D)[9, :, :, :10])
        assert torch.equal(kv.view(-1, H, 2, BS, D)[6, :, :, 5:], before.view(-1, H, 2, BS, D)[6, :, :, 5:])
    else:
        assert torch.equal(kv[:, untouched], before[:, untouched])
        assert torch.equal(kv[:, 9, :10], before[:, 9, :10]) and torch.equal(kv[:, 6, 5:], before[:, 6, 5:])


def test_layouts_the_connector_does_not_know_are_refused_by_shape():
    with pytest.raises(ValueError, match=r"unsupported vLLM KV cache layout \(10, 1, 16, 576\)"):
        PagedLayout.detect(torch.zeros(10, 1, BS, 576), BS, H, D)  # an MLA latent cache
    with pytest.raises(ValueError, match="unsupported"):
        PagedLayout.detect(torch.zeros(10, H, BS, 2 * D), 32, H, D)  # another block size
    layout = PagedLayout.detect(torch.zeros(4, H, BS, 2 * D), BS, H, D)
    with pytest.raises(ValueError, match="dtype"):
        layout.scatter(torch.zeros(4, H, BS, 2 * D), [0], 0, torch.zeros(H, 4, D, dtype=torch.float16), torch.zeros(H, 4, D, dtype=torch.float16))
    with pytest.raises(ValueError, match="do not fit"):
        layout.gather(torch.zeros(4, H, BS, 2 * D), [0, 1], 0, 33)


def test_loadable_tokens_are_whole_blocks_and_leave_one_prompt_token_to_compute():
    assert loadable_tokens(1000, 1040, 128) == 896
    assert loadable_tokens(1040, 1040, 128) == 1024  # all stored: the last token is still computed
    assert loadable_tokens(1024, 1024, 128) == 896  # 1023 loadable -> 7 whole blocks
    assert loadable_tokens(127, 5000, 128) == 0
    assert loadable_tokens(0, 5000, 128) == 0 and loadable_tokens(500, 1, 128) == 0


def test_saves_wait_for_the_prompt_then_send_only_what_kvmem_lacks():
    state = RequestState.create("r", num_prompt=1000, session="", chunk_tokens=256, stored=300, save=True)
    state.update_blocks(list(range(8)), replace=True)
    prompt = list(range(1000))
    state.computed = 512  # a chunked prefill: the prompt is not done
    assert state.take_save(prompt, 128) is None
    state.computed = 1000
    job = state.take_save(prompt, 128)
    assert (job.start, job.end) == (256, 896) and job.token_ids == prompt[:896] and job.block_ids == list(range(7))
    assert job.session_id.startswith("vllm-")
    assert state.take_save(prompt, 128) is None  # nothing new
    tokens = prompt + list(range(5000, 5030))  # decoding fills block 8 at token 1024
    state.update_blocks([8], replace=False)
    state.computed = 1023
    assert state.take_save(tokens, 128) is None
    state.computed = 1024
    job = state.take_save(tokens, 128)
    assert (job.start, job.end) == (768, 1024) and job.block_ids == list(range(8))


def test_an_unnamed_request_kvmem_already_holds_saves_nothing_a_named_one_sets_its_session():
    prompt = list(range(600))
    unnamed = RequestState.create("a", 600, "", 256, stored=600, save=True)
    unnamed.update_blocks(list(range(5)), replace=True)
    unnamed.computed = 600
    assert unnamed.take_save(prompt, 128) is None
    named = RequestState.create("b", 600, "chat-1", 256, stored=600, save=True)
    named.update_blocks(list(range(5)), replace=True)
    named.computed = 600
    job = named.take_save(prompt, 128)
    assert job.session_id == "chat-1" and (job.start, job.end) == (256, 512)  # the stored prefix is shared
    off = RequestState.create("c", 600, "", 256, stored=0, save=False)
    off.update_blocks(list(range(5)), replace=True)
    off.computed = 600
    assert off.take_save(prompt, 128) is None


def test_a_load_covers_the_tokens_after_vllms_own_hit_and_a_resumed_request_replaces_its_blocks():
    state = RequestState.create("r", 1000, "", 256, stored=900, save=True)
    state.local_computed = 256
    state.pending_load = (256, 896)
    state.update_blocks([3, 1, 4, 1, 5, 9, 2, 6], replace=True)
    job = state.take_load(list(range(1000)), 128)
    assert (job.start, job.end) == (256, 896) and job.token_ids == list(range(896)) and job.block_ids == [3, 1, 4, 1, 5, 9, 2]
    assert state.take_load(list(range(1000)), 128) is None and state.loaded == 640
    state.update_blocks([7, 7], replace=True)
    assert state.block_ids == [7, 7]


def test_settings_parse_the_kvmem_keys_and_refuse_typos_and_nonsense():
    settings = ConnectorSettings.from_extra_config({"kvmem_address": "h:1", "kvmem_save": "false", "kvmem_ttl_seconds": "60", "other": 1})
    assert (settings.address, settings.save, settings.ttl_seconds, settings.load) == ("h:1", False, 60, True)
    with pytest.raises(ValueError, match="unknown kvmem connector setting 'kvmem_adress'"):
        ConnectorSettings.from_extra_config({"kvmem_adress": "h:1"})
    with pytest.raises(ValueError, match="must be a number"):
        ConnectorSettings.from_extra_config({"kvmem_ttl_seconds": "soon"})
    with pytest.raises(ValueError, match="must not be negative"):
        ConnectorSettings.from_extra_config({"kvmem_timeout_s": -1})
    with pytest.raises(ValueError, match="true or false"):
        ConnectorSettings.from_extra_config({"kvmem_load": 3})


def test_restore_prefix_takes_a_range_and_cuts_it_where_the_stored_prefix_ends(client):
    layers = random_layers(TOY_SPEC, 40, seed=3)
    ids = list(range(500, 540))
    client.save("s", layers, ids)
    part = client.restore_prefix(ids + [1, 2, 3], start=16, end=48, build_cache=False)
    assert part.token_ids.tolist() == ids[16:40]  # cut at the 40 stored tokens
    assert all(torch.equal(k, ref[0][:, 16:40]) and torch.equal(v, ref[1][:, 16:40]) for (k, v), ref in zip(part.layers, layers))
    with pytest.raises(NotFound, match="only the first 40"):
        client.restore_prefix(ids + [1, 2, 3], start=40, build_cache=False)


def test_a_save_of_only_the_missing_tokens_shares_the_stored_prefix(client):
    layers = random_layers(TOY_SPEC, 50, seed=4)
    ids = list(range(900, 950))
    client.save("first", [(k[:, :32], v[:, :32]) for k, v in layers], ids[:32])
    client.save("longer", [(k[:, 32:], v[:, 32:]) for k, v in layers], ids, cache_start=32)
    restored = client.restore("longer", build_cache=False)
    assert all(torch.equal(k, ref[0]) and torch.equal(v, ref[1]) for (k, v), ref in zip(restored.layers, layers))
    other = ids[:32] + list(range(7000, 7018))  # only its first 32 tokens are stored
    with pytest.raises(Conflict, match="prefix changed"):  # tokens [32, 48) are missing: nothing is saved
        client.save("gap", [(k[:, 48:], v[:, 48:]) for k, v in layers], other, cache_start=48)
    with pytest.raises(NotFound):
        client.get("gap")


def test_a_kernel_order_inside_the_cpu_regions_is_followed_both_ways():
    """AVX2's CPU kernel keeps a block's keys dimension-major ([D, block_size]): with the positions
    a probe measured, gather and scatter read and write in that order."""
    from kvmem.vllm.layout import positions_from_probe

    # what a dimension-major kernel writes at place p = d * BS + t: token t + 1 and dim d + 1
    places = torch.arange(BS * D)
    key_pos = positions_from_probe(places % BS + 1, places // BS + 1, BS, D)
    value_pos = torch.arange(BS * D)
    kv = torch.zeros(5, H, BS, 2 * D)
    layout = PagedLayout.detect(kv, BS, H, D, key_pos, value_pos)
    assert layout.orders == ("dim", "token")  # moved as a transposed view, not by index
    keys, values = torch.randn(H, 20, D), torch.randn(H, 20, D)
    layout.scatter(kv, [3, 1], 6, keys, values)  # tokens [6, 26)
    regions = kv.view(5, H, 2, BS * D)
    token, dim = 9, 5  # token 9 is in block 3 at offset 9, the run's index 3
    assert regions[3, 1, 0, dim * BS + token] == keys[1, 3, dim]
    assert regions[3, 1, 1, token * D + dim] == values[1, 3, dim]
    got_keys, got_values = layout.gather(kv, [3, 1], 6, 26)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    with pytest.raises(ValueError, match="exactly once"):
        positions_from_probe(torch.ones(BS * D), places // BS + 1, BS, D)  # every place says token 1


def test_any_other_kernel_order_goes_through_the_general_path_for_whole_and_partial_blocks():
    generator = torch.Generator().manual_seed(5)
    key_pos, value_pos = torch.randperm(BS * D, generator=generator), torch.randperm(BS * D, generator=generator)
    kv = torch.zeros(6, H, BS, 2 * D)
    layout = PagedLayout.detect(kv, BS, H, D, key_pos, value_pos)
    assert layout.orders == ("other", "other")
    keys, values = torch.randn(H, 45, D), torch.randn(H, 45, D)
    layout.scatter(kv, [4, 0, 2, 5], 3, keys, values)  # tokens [3, 48): a partial block, two whole ones
    regions = kv.view(6, H, 2, BS * D)
    assert regions[0, 2, 0, key_pos[(20 - BS) * D + 7]] == keys[2, 17, 7]  # token 20 = block 0 (the second), offset 4
    assert regions[2, 1, 1, value_pos[(40 - 2 * BS) * D + 1]] == values[1, 37, 1]
    got_keys, got_values = layout.gather(kv, [4, 0, 2, 5], 3, 48)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


def test_restore_prefix_into_streams_each_chunk_to_the_caller(client):
    layers = random_layers(TOY_SPEC, 40, seed=6)
    ids = list(range(300, 340))
    client.save("streamed", layers, ids)
    received = {}

    def write(layer, token_start, keys, values):
        received[(layer, token_start)] = (keys.clone(), values.clone())

    assert client.restore_prefix_into(ids + [9], write, start=5, end=0) == (5, 40)
    for layer, (keys, values) in enumerate(layers):
        starts = sorted(start for (l, start) in received if l == layer)
        assert starts[0] == 5
        got_keys = torch.cat([received[(layer, s)][0] for s in starts], dim=1)
        got_values = torch.cat([received[(layer, s)][1] for s in starts], dim=1)
        assert torch.equal(got_keys, keys[:, 5:]) and torch.equal(got_values, values[:, 5:])
    with pytest.raises(NotFound):
        client.restore_prefix_into(list(range(10)), write)
