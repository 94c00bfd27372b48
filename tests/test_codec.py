"""Block and session record codecs: round trips, and every kind of damage is detected."""
import numpy as np
import pytest
import torch

from kvstore.chunking import block_storage_key, chain_key, chain_keys, ROOT_KEY
from kvstore.codec import decode_block, decode_session, encode_block, encode_session
from kvstore.errors import CorruptData, InvalidRequest
from kvstore.pieces import tensor_raw_view
from kvstore.records import BlockRef, SessionRecord
from kvstore.spec import DTYPE_CODES, ModelSpec

KEY = block_storage_key(b"k" * 16, 3)


def _encode(dtype, bias=False, key=KEY):
    keys, values = torch.randn(3, 5, 8).to(dtype), torch.randn(3, 5, 8).to(dtype)
    b = torch.randn(3, 5) if bias else None
    raw = lambda t: memoryview(tensor_raw_view(t)).cast("B")  # noqa: E731
    block = encode_block(key, 3, (3, 5, 8), DTYPE_CODES[dtype], raw(keys), raw(values), memoryview(b.numpy()).cast("B") if bias else None)
    return block, keys, values, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_block_round_trip_is_bit_exact(dtype, bias):
    block, keys, values, b = _encode(dtype, bias)
    decoded = decode_block(KEY, block.data)
    k, v, got_bias = decoded.tensors()
    assert k.dtype == dtype and torch.equal(k, keys) and torch.equal(v, values)
    assert (got_bias is None) == (not bias)
    if bias:
        assert torch.equal(got_bias, b)


def test_flipped_payload_byte_is_detected():
    block, *_ = _encode(torch.float16)
    for offset in (40, len(block.data) // 2, len(block.data) - 1):
        damaged = bytearray(block.data)
        damaged[offset] ^= 0x01
        with pytest.raises(CorruptData, match="checksum"):
            decode_block(KEY, bytes(damaged))


def test_checksum_is_bound_to_key_dtype_and_shape():
    block, *_ = _encode(torch.float32)
    with pytest.raises(CorruptData):
        decode_block(block_storage_key(b"k" * 16, 4), block.data)  # same bytes under another key
    damaged = bytearray(block.data)
    damaged[5] = DTYPE_CODES[torch.bfloat16]  # header claims another dtype (size then mismatches)
    with pytest.raises(CorruptData):
        decode_block(KEY, bytes(damaged))
    with pytest.raises(CorruptData):
        decode_block(KEY, block.data[:-4])


def test_encode_refuses_wrong_payload_sizes():
    with pytest.raises(InvalidRequest, match="expected"):
        encode_block(KEY, 0, (3, 5, 8), 1, b"\0" * 10, b"\0" * 480)


def _record():
    spec = ModelSpec("m", 2, 1, 4)
    return SessionRecord("t", "s", spec, np.arange(40, dtype=np.uint32), [BlockRef(b"a" * 16, 0, 32), BlockRef(b"b" * 16, 32, 8)],
                         positions=np.arange(40, dtype=np.int64) * 2, logical_length=80, has_bias=True, chained=False,
                         expires_at_ms=123, labels={"x": "y"})


def test_session_record_round_trip_and_damage():
    record = _record()
    data = encode_session(b"t\0s", record)
    back = decode_session(b"t\0s", data)
    assert back.blocks == record.blocks and np.array_equal(back.token_ids, record.token_ids)
    assert np.array_equal(back.positions, record.positions) and back.logical_length == 80 and back.labels == {"x": "y"}
    damaged = bytearray(data)
    damaged[-3] ^= 0x10
    with pytest.raises(CorruptData):
        decode_session(b"t\0s", bytes(damaged))
    with pytest.raises(CorruptData):
        decode_session(b"t\0other", data)


def test_chain_keys_name_prefix_tenant_and_model():
    tokens = np.arange(100, dtype=np.uint32)
    spec_a, spec_b = ModelSpec("a", 2, 1, 4), ModelSpec("b", 2, 1, 4)
    keys = chain_keys("t", spec_a.digest(), tokens, 32)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert keys == chain_keys("t", spec_a.digest(), tokens.copy(), 32)  # deterministic, not hash()
    assert chain_keys("u", spec_a.digest(), tokens, 32)[0] != keys[0]
    assert chain_keys("t", spec_b.digest(), tokens, 32)[0] != keys[0]
    changed = tokens.copy()
    changed[5] = 999
    other = chain_keys("t", spec_a.digest(), changed, 32)
    assert all(a != b for a, b in zip(keys, other))  # a change early in the prefix changes every later key
    assert keys[3] != chain_key("t", spec_a.digest(), keys[2], tokens[96:99])  # partial chunk != full chunk
    assert chain_key("t", spec_a.digest(), ROOT_KEY, tokens[:32]) == keys[0]
