"""What the store accepts it can read back: ids, ranges and spec fields are checked before
anything is written, and a refused request leaves the store exactly as it was."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmem import convert
from kvmem.v1 import kvmem_pb2 as pb
from kvstore.codec import decode_session, encode_session
from kvstore.errors import InvalidRequest, KvmemError, ModelMismatch
from kvstore.spec import ModelSpec, canonical_rope_json
from kvstore.store import SessionStore, StoreConfig, session_key, validate_id
from kvstore.validation import MAX_TTL_SECONDS
from tests.conftest import TOY_SPEC, random_layers

NOW = 1_700_000_000.0
COUNTERS = ("sessions", "chunks", "stored_bytes", "logical_bytes")


def pieces_for(store, spec, layers, start=0, bias=None):
    end = start + layers[0][0].shape[1]
    pieces = store.new_pieces(spec, start, end, has_bias=bias is not None)
    for layer, (k, v) in enumerate(layers):
        pieces.add_tensors(layer, start, k, v, None if bias is None else bias[layer])
    return pieces


def list_all(store, tenant):
    records, token = [], ""
    while True:
        page, token = store.list(tenant, page_size=1000, page_token=token)
        records += page
        if not token:
            return records


def snapshot(store, tenant):
    """Everything a refused request must leave unchanged: counters, the tenant's sessions and usage."""
    stats = store.stats()
    counters = {key: stats[key] for key in COUNTERS}
    try:
        listing = [(r.session_id, r.version, r.updated_at_ms, r.num_tokens, r.logical_length, r.expires_at_ms) for r in list_all(store, tenant)]
        usage = store.usage(tenant)
    except InvalidRequest:
        listing = usage = None
    return counters, listing, usage


def stored_tensors(store, tenant, session_id):
    keys, values, bias = store.restore(tenant, session_id).tensors()
    return keys, values, bias


def equal_layers(keys, values, layers, lo=0, hi=None):
    return all(torch.equal(k, a[:, lo:hi]) and torch.equal(v, b[:, lo:hi]) for k, v, (a, b) in zip(keys, values, layers))


@pytest.fixture
def fixed_store(store_config):
    store = SessionStore.open(store_config, clock=lambda: NOW)
    yield store
    store.close()


# ------------------------------------------------------------------ ids
REFUSED_IDS = ["", "x" * 257, "a\nb", "nul\x00", "next\x85line", "csi\x9b", "zero\u200bwidth", "line\u2028sep", "para\u2029", "\ufeffbom", "rtl\u202e", "lone\ud800"]


@pytest.mark.parametrize("bad_id", REFUSED_IDS)
def test_ids_with_control_or_format_characters_are_refused(fixed_store, bad_id):
    layers = random_layers(TOY_SPEC, 5)
    before = snapshot(fixed_store, "t")
    with pytest.raises(InvalidRequest):
        fixed_store.save("t", bad_id, TOY_SPEC, np.arange(5), pieces_for(fixed_store, TOY_SPEC, layers))
    with pytest.raises(InvalidRequest):
        fixed_store.save(bad_id, "s", TOY_SPEC, np.arange(5), pieces_for(fixed_store, TOY_SPEC, layers))
    with pytest.raises(InvalidRequest):
        validate_id(bad_id, "session id", 256)  # still importable from kvstore.store
    assert snapshot(fixed_store, "t") == before


@pytest.mark.parametrize("good_id", ["é", "日本語", "a b", "emoji-😀", "private-\ue000", "x" * 256, "tab-less.id_1"])
def test_printable_unicode_ids_round_trip(fixed_store, good_id):
    layers = random_layers(TOY_SPEC, 5)
    fixed_store.save(good_id, good_id, TOY_SPEC, np.arange(5), pieces_for(fixed_store, TOY_SPEC, layers))
    assert [r.session_id for r in fixed_store.list(good_id)[0]] == [good_id]
    keys, values, _ = stored_tensors(fixed_store, good_id, good_id)
    assert equal_layers(keys, values, layers)


def test_refused_categories_are_exactly_control_format_and_separators():
    for ch in ("\x85", "\x9b", "\u200b", "\u2028", "\ufeff"):
        assert unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"}
        with pytest.raises(InvalidRequest, match="U\\+"):
            validate_id(f"a{ch}b", "tenant", 256)
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        validate_id("\udfff", "tenant", 256)
    validate_id("a\u00a0b", "tenant", 256)  # no-break space is Zs: allowed


# ------------------------------------------------------------------ spec fields
def test_rope_json_is_canonical():
    a = ModelSpec("m", 1, 1, 2, rope_json='{"theta": 10000.0, "scaling": {"factor": 2.50, "type": "linear"}}')
    b = ModelSpec("m", 1, 1, 2, rope_json='{"scaling":{"type":"linear","factor":2.5},"theta":10000}')
    assert a.rope_json == b.rope_json == '{"scaling":{"factor":2.5,"type":"linear"},"theta":10000}'
    assert a == b and a.digest() == b.digest()
    assert ModelSpec("m", 1, 1, 2).rope_json == "" and canonical_rope_json("null") == "null"
    assert canonical_rope_json(a.rope_json) == a.rope_json  # idempotent
    assert canonical_rope_json('{"x": 1e-7, "y": 0.1}') == '{"x":1e-07,"y":0.1}'  # repr form


@pytest.mark.parametrize("text", ["{", "theta=10000", "[1, 2]", '"text"', "3", "NaN", '{"theta": NaN}', '{"theta": Infinity}', '{"t": 1e400}', "{} {}"])
def test_rope_json_that_is_not_a_json_object_is_refused(text):
    with pytest.raises(InvalidRequest, match="rope_json is not JSON"):
        ModelSpec("m", 1, 1, 2, rope_json=text)


@pytest.mark.parametrize("value", [-1, (1 << 62) + 1, 1 << 64, True, 1.5])
def test_max_position_range(value):
    with pytest.raises(InvalidRequest, match="max_position"):
        ModelSpec("m", 1, 1, 2, max_position=value)
    assert ModelSpec("m", 1, 1, 2, max_position=1 << 62).max_position == 1 << 62


def test_wire_spec_needs_a_context_window_and_a_hex_fingerprint():
    good = dataclasses.replace(TOY_SPEC, weights_fingerprint="0123456789abcdef" * 2, rope_json='{"rope_theta":10000.0}')
    message = convert.spec_to_pb(good)
    assert message.weights_fingerprint == good.weights_fingerprint
    assert convert.spec_from_pb(message) == good
    for max_position in (0, (1 << 62) + 1):
        message.max_position = max_position
        with pytest.raises(InvalidRequest, match=r"max_position must be in 1..2\^62"):
            convert.spec_from_pb(message)
    message.max_position = 0
    assert convert.spec_from_pb(message, stored=True).max_position == 0  # an old record sent back
    message.max_position = 4096
    for fingerprint in ("ABCDEF", "xyz", "a" * 129, "12 34"):
        message.weights_fingerprint = fingerprint
        with pytest.raises(InvalidRequest, match="weights_fingerprint"):
            convert.spec_from_pb(message)
    message.weights_fingerprint = "a" * 128
    assert convert.spec_from_pb(message).weights_fingerprint == "a" * 128
    message.rope_json = "not json"
    with pytest.raises(InvalidRequest, match="rope_json"):
        convert.spec_from_pb(message)
    assert convert.spec_from_pb(pb.ModelSpec(name="m", num_layers=1, num_kv_heads=1, head_dim=2, dtype=pb.DTYPE_FLOAT16, max_position=8)).weights_fingerprint == ""


def test_fingerprint_is_part_of_the_digest_and_an_unknown_one_keeps_old_digests():
    spec = ModelSpec("m", 2, 1, 4, max_position=64)
    old_digest = hashlib.blake2b(json.dumps({k: v for k, v in spec.to_dict().items() if k != "weights_fingerprint"},
                                            sort_keys=True, separators=(",", ":")).encode(), digest_size=16, person=b"kvmem-spec").digest()
    assert spec.digest() == old_digest  # chunk keys written before fingerprints still match
    fingerprinted = dataclasses.replace(spec, weights_fingerprint="ab" * 16)
    assert fingerprinted.digest() != spec.digest()
    with pytest.raises(ModelMismatch, match="weights_fingerprint"):
        spec.require_same(fingerprinted, "session 's'")
    with pytest.raises(InvalidRequest, match="unknown fields"):
        ModelSpec.from_dict({**spec.to_dict(), "colour": "red"})


def test_records_written_before_fingerprints_and_canonical_rope_still_decode(fixed_store, monkeypatch):
    """An old record: spec dict without weights_fingerprint, rope_json as old from_model wrote it."""
    layers = random_layers(TOY_SPEC, 20)
    spec = dataclasses.replace(TOY_SPEC, rope_json='{"rope_theta":100000.0,"rope_type":"default"}')
    fixed_store.save("t", "old", spec, np.arange(20), pieces_for(fixed_store, spec, layers))
    record = fixed_store.get("t", "old")
    legacy_dict = {**record.spec.to_dict(), "rope_json": '{"rope_theta":100000.0,"rope_type":"default"}'}
    del legacy_dict["weights_fingerprint"]
    monkeypatch.setattr(ModelSpec, "to_dict", lambda self: dict(legacy_dict))
    skey = session_key("t", "old")
    legacy = encode_session(skey, record)
    monkeypatch.undo()
    assert b"weights_fingerprint" not in legacy and b"100000.0" in legacy
    decoded = decode_session(skey, legacy)
    assert decoded.spec == spec and decoded.spec.rope_json == '{"rope_theta":100000,"rope_type":"default"}'
    fixed_store.backend.write(lambda txn: txn.put("sessions", skey, legacy))
    keys, values, _ = fixed_store.restore("t", "old", dataclasses.replace(spec, rope_json='{"rope_type": "default", "rope_theta": 1e5}')).tensors()
    assert equal_layers(keys, values, layers)


# ------------------------------------------------------------------ ranges
def _saved(store, session_id="s", tokens=20, spec=TOY_SPEC, **kwargs):
    layers = random_layers(spec, tokens)
    store.save("t", session_id, spec, np.arange(tokens), pieces_for(store, spec, layers), **kwargs)
    return layers


@pytest.mark.parametrize("ttl", [MAX_TTL_SECONDS + 1, 9223372036854776, -1, 1 << 64])
def test_ttl_out_of_range_is_refused_everywhere_and_changes_nothing(fixed_store, ttl):
    layers = _saved(fixed_store)
    before = snapshot(fixed_store, "t")
    with pytest.raises(InvalidRequest, match="ttl_seconds must be in 0..315360000"):
        fixed_store.save("t", "new", TOY_SPEC, np.arange(20), pieces_for(fixed_store, TOY_SPEC, layers), ttl_seconds=ttl)
    extra = random_layers(TOY_SPEC, 4, seed=1)
    with pytest.raises(InvalidRequest, match="ttl_seconds"):
        fixed_store.append("t", "s", TOY_SPEC, np.arange(4), pieces_for(fixed_store, TOY_SPEC, extra, 20), ttl_seconds=ttl)
    with pytest.raises(InvalidRequest, match="ttl_seconds"):
        fixed_store.fork("t", "s", "child", ttl_seconds=ttl)
    assert snapshot(fixed_store, "t") == before
    keys, values, _ = stored_tensors(fixed_store, "t", "s")
    assert equal_layers(keys, values, layers)
    fixed_store.append("t", "s", TOY_SPEC, np.arange(4), pieces_for(fixed_store, TOY_SPEC, extra, 20))  # still healthy


def test_ten_year_ttl_is_kept():
    store_ttl = MAX_TTL_SECONDS
    with pytest.raises(ValueError, match="default_ttl_seconds"):
        StoreConfig(default_ttl_seconds=store_ttl + 1)
    assert StoreConfig(default_ttl_seconds=store_ttl).default_ttl_seconds == store_ttl


def test_ten_year_ttl_round_trips(fixed_store):
    _saved(fixed_store, ttl_seconds=MAX_TTL_SECONDS)
    assert fixed_store.get("t", "s").expires_at_ms == int(NOW * 1000) + MAX_TTL_SECONDS * 1000
    fixed_store.fork("t", "s", "f", ttl_seconds=MAX_TTL_SECONDS)
    assert fixed_store.get("t", "f").expires_at_ms == int(NOW * 1000) + MAX_TTL_SECONDS * 1000


@pytest.mark.parametrize("positions", [
    [-1, 1, 2, 3],
    [0, 1, 2, 1 << 62],
    [0, 1, 2, (1 << 63) + 5],  # what a uint64 wire value wraps to when cast to int64
    [0, 1, 2, (1 << 64) - 1],
    np.array([0, 1, 2, (1 << 63)], dtype=np.uint64),
    np.array([0, 1, 2, -5], dtype=np.int64),
])
def test_positions_out_of_range_are_refused(fixed_store, positions):
    layers = random_layers(TOY_SPEC, 4)
    before = snapshot(fixed_store, "t")
    with pytest.raises(InvalidRequest, match=r"positions must be in 0..4611686018427387903 \(below 2\^62\)"):
        fixed_store.save("t", "c", TOY_SPEC, np.arange(4), pieces_for(fixed_store, TOY_SPEC, layers), positions=positions)
    assert snapshot(fixed_store, "t") == before


def test_a_session_longer_than_the_window_is_stored(fixed_store):
    """Contexts past the model's window are what retrieval and compaction are for: stored at their
    positions; only 2^62 bounds them."""
    spec = dataclasses.replace(TOY_SPEC, max_position=16)
    _saved(fixed_store, tokens=20, spec=spec)
    extra = random_layers(spec, 1)
    fixed_store.append("t", "s", spec, np.arange(1), pieces_for(fixed_store, spec, extra, 20))
    assert fixed_store.get("t", "s").logical_length == 21
    positions = [0, 1, 2, 100]
    fixed_store.save("t", "p", spec, np.arange(4), pieces_for(fixed_store, spec, random_layers(spec, 4)), positions=positions, logical_length=200)
    assert fixed_store.get("t", "p").logical_length == 200


@pytest.mark.parametrize("logical, match", [
    ((1 << 64) - 1, "below 2\\^62"),
    (1 << 62, "below 2\\^62"),
    (10, "at least the 12 stored tokens"),
    (-3, "at least"),
    (99, "exceed the largest position 99"),
])
def test_logical_length_rules(fixed_store, logical, match):
    layers = random_layers(TOY_SPEC, 12)
    positions = [0, 1, 2, 3, 10, 20, 30, 40, 50, 97, 98, 99]
    before = snapshot(fixed_store, "t")
    with pytest.raises(InvalidRequest, match=match):
        fixed_store.save("t", "c", TOY_SPEC, np.arange(12), pieces_for(fixed_store, TOY_SPEC, layers), positions=positions, logical_length=logical)
    assert snapshot(fixed_store, "t") == before
    fixed_store.save("t", "c", TOY_SPEC, np.arange(12), pieces_for(fixed_store, TOY_SPEC, layers), positions=positions, logical_length=4096)


def test_append_that_would_pass_2_62_is_refused_before_writing(fixed_store):
    layers = random_layers(TOY_SPEC, 4)
    top = (1 << 62) - 2
    fixed_store.save("t", "c", TOY_SPEC, np.arange(4), pieces_for(fixed_store, TOY_SPEC, layers), positions=[0, 1, 2, 4000], logical_length=top - 1)
    before = snapshot(fixed_store, "t")
    extra = random_layers(TOY_SPEC, 3, seed=2)
    with pytest.raises(InvalidRequest, match=r"logical length after the append .* must be below 2\^62"):
        fixed_store.append("t", "c", TOY_SPEC, np.arange(3), pieces_for(fixed_store, TOY_SPEC, extra, 4))
    assert snapshot(fixed_store, "t") == before
    fixed_store.append("t", "c", TOY_SPEC, np.arange(2), pieces_for(fixed_store, TOY_SPEC, [(k[:, :2], v[:, :2]) for k, v in extra], 4))
    record = fixed_store.get("t", "c")
    assert record.logical_length == top + 1 and list(record.positions) == [0, 1, 2, 4000, top - 1, top]


@pytest.mark.parametrize("tokens", [[0, -1, 2], [0, 1 << 32, 2], np.array([1.0, 2.0, 3.0]), [[1, 2, 3]]])
def test_token_ids_outside_uint32_are_refused(fixed_store, tokens):
    layers = random_layers(TOY_SPEC, 3)
    with pytest.raises(InvalidRequest, match="token ids"):
        fixed_store.save("t", "s", TOY_SPEC, tokens, pieces_for(fixed_store, TOY_SPEC, layers))
    assert fixed_store.stats()["sessions"] == 0


def test_text_and_labels_must_be_valid_unicode(fixed_store):
    layers = random_layers(TOY_SPEC, 3)
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        fixed_store.save("t", "s", TOY_SPEC, np.arange(3), pieces_for(fixed_store, TOY_SPEC, layers), text="bad \ud800")
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        fixed_store.save("t", "s", TOY_SPEC, np.arange(3), pieces_for(fixed_store, TOY_SPEC, layers), labels={"k": "\udc00"})
    assert fixed_store.stats()["sessions"] == 0


# ------------------------------------------------------------------ property: refused => unchanged, accepted => readable
def mostly(good, bad, tenths_bad: int = 2):
    """``good`` in (10 - tenths_bad) of 10 draws, else ``bad``: most examples reach the store."""
    return st.integers(0, 9).flatmap(lambda i: bad if i >= 10 - tenths_bad else good)  # Hypothesis favours small i


_SPECIAL_CHARS = st.sampled_from(["\x00", "\n", "\x85", "\x9b", "\u200b", "\u2028", "\u2029", "\ufeff", "\ud800", "\udfff", "é", "😀", " ", "\ue000"])
_COMMON_IDS = st.sampled_from(["s", "t", "a", "é", "日本", "sess-1"])
_ANY_IDS = st.one_of(
    st.text(alphabet=st.one_of(st.characters(exclude_categories=()), _SPECIAL_CHARS), min_size=0, max_size=6),
    st.sampled_from(["x" * 256, "x" * 257, "y" * 200 + "é" * 28]),
)
ids = mostly(_COMMON_IDS, _ANY_IDS, 1)
HUGE = [1 << 62, (1 << 62) - 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -1]
_GOOD_TTLS = st.one_of(st.just(0), st.integers(0, MAX_TTL_SECONDS), st.just(MAX_TTL_SECONDS))
ttls = mostly(_GOOD_TTLS, st.sampled_from([MAX_TTL_SECONDS + 1, 9223372036854776, -1, (1 << 64) - 1]), 1)
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=4)),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=6)
_GOOD_ROPES = st.one_of(
    st.just(""),
    st.sampled_from(['{"theta":10000}', '{"theta": 10000.0}', "null", '{"rope_theta": 1e5, "rope_type": "default"}']),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False)), max_size=3).map(json.dumps),
)
_ANY_ROPES = st.one_of(
    st.dictionaries(st.text(max_size=5), json_values, max_size=3).map(json.dumps),  # may hold NaN / Infinity
    json_values.map(json.dumps),
    st.text(max_size=12),
    st.sampled_from(["[1]", "NaN", '{"a":1e400}', "{", '"s"']),
)
rope_texts = mostly(_GOOD_ROPES, _ANY_ROPES, 2)
max_positions = mostly(st.one_of(st.just(0), st.integers(1, 64), st.integers(65, 1 << 20), st.just(1 << 62)),
                       st.sampled_from([(1 << 62) + 1, -1, (1 << 64) - 1]), 1)


def _valid_id(value: str) -> bool:
    try:
        encoded = value.encode()
    except UnicodeEncodeError:
        return False
    return 0 < len(encoded) <= 256 and not any(unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"} for ch in value)


def _expected_logical(spec, total, positions, logical):
    """The logical length the rules allow, or None when they refuse."""
    bound = 1 << 62  # the model's window is no storage bound (kvstore.validation.position_bound)
    if positions is None:
        if total > bound:
            return None
        largest = total - 1
    else:
        if min(positions) < 0 or max(positions) >= bound:
            return None
        largest = max(positions)
    if logical != 0 and (logical < total or logical <= largest):
        return None
    value = logical or largest + 1
    if value >= 1 << 62:
        return None
    return value


@contextlib.contextmanager
def fresh_store(root):
    """A new store per example, so every example is deterministic (Hypothesis replays them)."""
    directory = Path(tempfile.mkdtemp(dir=root))
    config = StoreConfig(data_dir=directory, chunk_tokens=16, cpu_tier_bytes=8 << 20, lmdb_map_bytes=8 << 20,
                         lmdb_max_map_bytes=256 << 20, durable=False)
    store = SessionStore.open(config, clock=lambda: NOW)
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)


def _attempt(store, tenant, call):
    """Run ``call``; refused => snapshot unchanged. Returns the result or None when refused."""
    before = snapshot(store, tenant)
    try:
        return call()
    except KvmemError as exc:
        event(f"refused: {type(exc).__name__}: {str(exc)[:30]}")
        assert snapshot(store, tenant) == before
        return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_property_refused_changes_nothing_and_accepted_reads_back_bit_exact(tmp_path_factory, data):
    with fresh_store(tmp_path_factory.getbasetemp()) as store:
        _property_example(store, data)


def _property_example(store, data):
    tenant, session_id = data.draw(ids, "tenant"), data.draw(ids, "session_id")
    rope = data.draw(rope_texts, "rope_json")
    max_position = data.draw(max_positions, "max_position")
    dims = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 4), st.sampled_from(["float32", "float16", "bfloat16"])), "dims")
    try:
        spec = ModelSpec("prop", *dims, rope_json=rope, max_position=max_position)
    except InvalidRequest:
        event("spec refused")
        if 0 <= max_position <= 1 << 62:  # then the rope text was the reason
            with pytest.raises(InvalidRequest, match="rope_json"):
                canonical_rope_json(rope)
        return
    assert canonical_rope_json(spec.rope_json) == spec.rope_json

    total = data.draw(st.integers(1, 40), "T")
    tokens = data.draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=total, max_size=total), "tokens")
    if data.draw(st.integers(0, 9), "bad token") == 9:
        tokens[data.draw(st.integers(0, total - 1))] = data.draw(st.sampled_from([-1, 1 << 32, (1 << 64) - 1]), "bad token id")
    window = min(spec.max_position or 1 << 20, 1 << 20)
    positions = data.draw(st.one_of(st.none(), st.lists(st.integers(0, window - 1), min_size=total, max_size=total)), "positions")
    if positions is not None and data.draw(st.integers(0, 3), "odd position") == 3:
        positions[data.draw(st.integers(0, total - 1))] = data.draw(st.sampled_from(HUGE + [max(max_position - 1, 0), max_position]), "odd position value")
    logical = data.draw(st.one_of(st.just(0), st.just(0), st.integers(0, window + 1), st.sampled_from(HUGE + [total, max_position, max_position + 1])), "logical_length")
    ttl = data.draw(ttls, "ttl")
    has_bias = data.draw(st.booleans(), "has_bias")
    overwrite = data.draw(st.booleans(), "overwrite")
    layers = random_layers(spec, total, seed=data.draw(st.integers(0, 1000), "seed"))
    bias = [torch.randn(spec.num_kv_heads, total) for _ in range(spec.num_layers)] if has_bias else None

    exists = data.draw(st.booleans(), "session exists") and _valid_id(tenant) and _valid_id(session_id)
    if exists:
        store.save(tenant, session_id, TOY_SPEC, np.arange(3), pieces_for(store, TOY_SPEC, random_layers(TOY_SPEC, 3)))
    expected_logical = _expected_logical(spec, total, positions, logical)
    should_work = (_valid_id(tenant) and _valid_id(session_id) and all(0 <= t < 1 << 32 for t in tokens) and expected_logical is not None
                   and 0 <= ttl <= MAX_TTL_SECONDS and (overwrite or not exists))

    pieces = pieces_for(store, spec, layers, bias=bias)
    result = _attempt(store, tenant, lambda: store.save(tenant, session_id, spec, tokens, pieces, positions=positions, logical_length=logical,
                                                        ttl_seconds=ttl, overwrite=overwrite, labels={"k": "v"}, text="some text"))
    assert (result is not None) == should_work, (tenant, session_id, positions, logical, ttl)
    event(f"save {'stored' if result else 'refused'}")
    if result is None:
        return
    record = store.get(tenant, session_id)
    assert record.spec == spec and list(record.token_ids) == tokens and record.logical_length == expected_logical
    assert list(record.positions_or_default()) == (positions if positions is not None else list(range(total)))
    assert record.expires_at_ms == (int(NOW * 1000) + ttl * 1000 if ttl else 0) and record.labels == {"k": "v"}
    assert session_id in [r.session_id for r in list_all(store, tenant)]
    keys, values, got_bias = stored_tensors(store, tenant, session_id)
    assert equal_layers(keys, values, layers)
    assert (got_bias is None) == (bias is None) and (bias is None or all(torch.equal(a, b) for a, b in zip(got_bias, bias)))
    assert store.session_text(tenant, session_id) == "some text"

    # append to the saved session
    added = data.draw(st.integers(1, 8), "added")
    new_ttl = data.draw(ttls, "append ttl")
    extra = random_layers(spec, added, seed=7)
    extra_bias = [torch.randn(spec.num_kv_heads, added) for _ in range(spec.num_layers)] if has_bias else None
    new_logical = expected_logical + added
    bound = 1 << 62
    append_ok = (0 <= new_ttl <= MAX_TTL_SECONDS and new_logical < 1 << 62 and (record.positions is not None or total + added <= bound))
    appended = _attempt(store, tenant, lambda: store.append(tenant, session_id, spec, list(range(added)), pieces_for(store, spec, extra, total, extra_bias), ttl_seconds=new_ttl))
    assert (appended is not None) == append_ok, (expected_logical, added, new_ttl, spec.max_position)
    event(f"append {'stored' if appended else 'refused'}")
    if appended is not None:
        record = store.get(tenant, session_id)
        assert record.num_tokens == total + added and record.logical_length == new_logical and record.version == 2
        keys, values, _ = stored_tensors(store, tenant, session_id)
        assert equal_layers([k[:, :total] for k in keys], [v[:, :total] for v in values], layers)
        assert equal_layers([k[:, total:] for k in keys], [v[:, total:] for v in values], extra)
        total += added

    # fork it
    target = data.draw(ids, "fork target")
    at = data.draw(st.integers(-1, total + 1), "at")
    fork_ttl = data.draw(ttls, "fork ttl")
    target_exists = target != session_id and _valid_id(target) and target in [r.session_id for r in list_all(store, tenant)]
    fork_ok = _valid_id(target) and 1 <= at <= total and 0 <= fork_ttl <= MAX_TTL_SECONDS and not target_exists
    if target == session_id:
        return  # overwriting the source by its own fork is out of scope here
    forked = _attempt(store, tenant, lambda: store.fork(tenant, session_id, target, at, ttl_seconds=fork_ttl))
    assert (forked is not None) == fork_ok
    event(f"fork {'stored' if forked else 'refused'}")
    if forked is not None:
        source_keys, source_values, _ = stored_tensors(store, tenant, session_id)
        keys, values, _ = stored_tensors(store, tenant, target)
        assert all(torch.equal(k, s[:, :at]) and torch.equal(v, w[:, :at]) for k, v, s, w in zip(keys, values, source_keys, source_values))
        store.delete(tenant, target)


def test_longest_ids_fit_lmdb_keys_and_stay_distinct(fixed_store):
    """tenant + session id can reach 513 bytes; LMDB keys stop at 511 (session keys are cut and hashed)."""
    tenant, first, second = "t" * 256, "y" * 255 + "a", "y" * 255 + "b"
    layers_a, layers_b = random_layers(TOY_SPEC, 20, seed=1), random_layers(TOY_SPEC, 20, seed=2)
    fixed_store.save(tenant, first, TOY_SPEC, np.arange(20), pieces_for(fixed_store, TOY_SPEC, layers_a), text="first", ttl_seconds=60)
    fixed_store.save(tenant, second, TOY_SPEC, np.arange(100, 120), pieces_for(fixed_store, TOY_SPEC, layers_b), text="second")
    assert sorted(r.session_id for r in list_all(fixed_store, tenant)) == [first, second]
    assert fixed_store.session_text(tenant, first) == "first" and fixed_store.session_text(tenant, second) == "second"
    keys, values, _ = stored_tensors(fixed_store, tenant, second)
    assert equal_layers(keys, values, layers_b)
    fixed_store.fork(tenant, first, "z" * 256, 10)
    fixed_store.delete(tenant, first)
    assert [r.session_id for r in list_all(fixed_store, tenant)] == [second, "z" * 256]
    assert fixed_store.usage(tenant).sessions == 2
