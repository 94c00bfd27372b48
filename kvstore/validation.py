"""Checks on everything a caller hands the store, run before anything is written.

The rule they serve: nothing is stored that cannot be read back. Every id, range and array a
request carries is checked here against what the codec packs (see ``kvstore.codec``) and what
the wire carries (uint64 / int64 fields, UTF-8 strings), and refused with InvalidRequest naming
the limit, so a bad request stores nothing and never fails half-way inside a transaction.

Packed widths this guards (codec.encode_session): token ids ``<u4``, positions ``<i8``, block
refs ``start <u8, count <u4``, counts of tokens/positions/blocks ``<u4``, the TTL index key
``>Q`` of expires_at_ms; metadata (logical_length, timestamps, labels) is JSON, but it travels
as uint64 / UTF-8 on the wire, so it is bounded the same way.
"""
from __future__ import annotations

import unicodedata
from typing import Any

import numpy as np

from kvstore.errors import InvalidRequest
from kvstore.spec import MAX_POSITION_LIMIT

MAX_TTL_SECONDS = 315_360_000  # ten years
POSITION_LIMIT = MAX_POSITION_LIMIT  # every position and logical length stays below 2^62
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})  # control, format, line/paragraph separators


def validate_id(value: str, what: str, max_bytes: int) -> None:
    """Ids (tenants, session ids): 1..max_bytes bytes of UTF-8 without Unicode control or format
    characters (categories Cc, Cf, Zl, Zp: e.g. U+0000, U+0085, U+200B, U+2028, U+FEFF)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be text, got {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid Unicode text (it holds a lone surrogate); send UTF-8") from None
    if not encoded:
        raise InvalidRequest(f"{what} is empty; give a non-empty id of at most {max_bytes} bytes")
    if len(encoded) > max_bytes:
        raise InvalidRequest(f"{what} is {len(encoded)} bytes; the limit is {max_bytes}")
    for index, ch in enumerate(value):
        category = unicodedata.category(ch)
        if category in _REFUSED_CATEGORIES:
            raise InvalidRequest(
                f"{what} contains U+{ord(ch):04X} (Unicode category {category}) at character {index}; "
                "ids may not hold control or format characters: use printable text"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_ttl(ttl_seconds: int, what: str = "ttl_seconds") -> int:
    """0 (server default) .. ten years; returns it as a Python int."""
    if not _is_int(ttl_seconds) or not 0 <= int(ttl_seconds) <= MAX_TTL_SECONDS:
        raise InvalidRequest(f"{what} must be in 0..{MAX_TTL_SECONDS} (ten years; 0 = the server default), got {ttl_seconds!r}")
    return int(ttl_seconds)


def _int_array(values: Any, what: str, low_ok: int, high_excl: int, dtype: type, limit: str) -> np.ndarray:
    """``values`` (a flat integer sequence) as a ``dtype`` array after checking every value is in
    low_ok..high_excl-1; never wraps or rounds (Python ints of any size are checked as ints)."""
    if isinstance(values, (list, tuple, range)):
        items = list(values)
        if not all(_is_int(x) for x in items):
            raise InvalidRequest(f"{what} must be a flat list of integers")
        if not items:
            return np.zeros(0, dtype=dtype)
        low, high = int(min(items)), int(max(items))
        if low < low_ok or high >= high_excl:
            raise InvalidRequest(f"{what} must be in {low_ok}..{high_excl - 1} ({limit}), got {low}..{high}")
        return np.array(items, dtype=dtype)
    try:
        raw = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(f"{what} must be a flat list of integers: {exc}") from None
    if raw.ndim != 1:
        raise InvalidRequest(f"{what} must be one flat sequence of integers, got shape {tuple(raw.shape)}")
    if raw.dtype == object:
        return _int_array(raw.tolist(), what, low_ok, high_excl, dtype, limit)
    if raw.size and raw.dtype.kind not in "iu":
        raise InvalidRequest(f"{what} must be integers, got {raw.dtype}")
    if raw.size:
        low, high = int(raw.min()), int(raw.max())
        if low < low_ok or high >= high_excl:
            raise InvalidRequest(f"{what} must be in {low_ok}..{high_excl - 1} ({limit}), got {low}..{high}")
    return raw.astype(dtype, copy=False)


def token_ids_array(token_ids: Any, what: str = "token ids") -> np.ndarray:
    """uint32 [T] from any integer sequence; refuses values outside 0..2^32-1 (never wraps)."""
    if isinstance(token_ids, np.ndarray) and token_ids.dtype == np.uint32 and token_ids.ndim == 1:
        return token_ids
    return _int_array(token_ids, what, 0, 1 << 32, np.uint32, "uint32")


def positions_array(positions: Any, total: int) -> np.ndarray:
    """int64 [T] original positions, each in 0..2^62-1.

    Positions past the model's ``max_position`` are stored on purpose: contexts longer than the
    window are what retrieval (a window's worth of them) and compaction (shrunk to fit) are for,
    both at their original positions. 2^62 is the storage bound: int64, room for appends, no wrap.
    """
    array = _int_array(positions, "positions", 0, POSITION_LIMIT, np.int64, "below 2^62")
    if array.shape != (total,):
        raise InvalidRequest(f"{array.size} positions given for {total} tokens; give one position per token")
    return array


def check_logical_length(logical_length: int, total: int, positions: np.ndarray | None) -> int:
    """The logical length a save records: the given one (0 = derive it) after its checks.

    It must be at least T and past the last position, and below 2^62. ``positions`` None means
    0..T-1.
    """
    if not _is_int(logical_length):
        raise InvalidRequest(f"logical_length must be an integer, got {logical_length!r}")
    logical_length = int(logical_length)
    largest = int(positions.max()) if positions is not None and len(positions) else total - 1
    if logical_length == 0:
        logical_length = largest + 1
    elif logical_length < 0 or logical_length < total or logical_length <= largest:
        raise InvalidRequest(
            f"logical_length {logical_length} must be at least the {total} stored tokens and exceed the largest position "
            f"{largest}; send 0 to derive it"
        )
    check_logical_bound(logical_length, "logical_length")
    return logical_length


def check_logical_bound(logical_length: int, what: str) -> None:
    """``what`` (a logical length) must stay below 2^62 (see ``positions_array``)."""
    if logical_length >= POSITION_LIMIT:
        raise InvalidRequest(f"{what} {logical_length} must be below 2^62")


def text_bytes(text: str | None, what: str = "text") -> bytes | None:
    """UTF-8 bytes of a session's text (None stays None); refuses lone surrogates."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidRequest(f"{what} must be a string, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid Unicode text (it holds a lone surrogate); send UTF-8") from None


def validate_labels(labels: dict[str, str] | None) -> dict[str, str]:
    """A copy of the labels; keys and values must be UTF-8 encodable strings."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise InvalidRequest(f"labels must be a mapping of strings, got {type(labels).__name__}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest(f"labels must map strings to strings, got {key!r}: {value!r}")
        text_bytes(key, "a label key")
        text_bytes(value, f"label {key!r}")
    return dict(labels)
