"""KV arriving in arbitrary token-range pieces (a gRPC stream, or tensors in process).

A save or append receives KV as pieces: (layer, token_start, n, keys, values, bias). KVPieces
validates each piece against the model spec as it arrives, checks at the end that every layer
covers the requested token range exactly once, and then hands out the payload of any block
range, zero-copy when a piece lines up with the block (the common case: the client aligns its
chunks to the store's chunk size).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.codec import RAW_DTYPES, element_size
from kvstore.errors import InvalidRequest
from kvstore.spec import DTYPE_CODES, ModelSpec

_TORCH_RAW = {1: torch.int32, 2: torch.int16, 3: torch.int16}


@dataclass(frozen=True)
class _Piece:
    start: int
    count: int
    keys: np.ndarray  # raw bits [H, n, D]
    values: np.ndarray  # raw bits [H, n, D]
    bias: np.ndarray | None  # float32 [H, n]

    @property
    def end(self) -> int:
        return self.start + self.count


def tensor_raw_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy raw-bit view of a CPU tensor (copies only if it is not contiguous or on GPU)."""
    code = DTYPE_CODES[tensor.dtype]
    return tensor.detach().to("cpu").contiguous().view(_TORCH_RAW[code]).numpy().view(RAW_DTYPES[code])


def check_piece(spec: ModelSpec, expected_dtype: int, has_bias: bool, start: int, end: int, layer: int, token_start: int, count: int, dtype_code: int, keys, values, bias):
    """Check one piece of KV against the spec and the expected token range [start, end);
    returns raw-bit views keys, values [H, n, D] and bias float32 [H, n] (or None)."""
    if not 0 <= layer < spec.num_layers:
        raise InvalidRequest(f"chunk for layer {layer}, but model {spec.name!r} has {spec.num_layers} layers (0..{spec.num_layers - 1})")
    if dtype_code != expected_dtype:
        raise InvalidRequest(f"layer {layer}: chunk dtype code {dtype_code} does not match the model spec dtype {spec.dtype!r}; convert the cache to {spec.dtype}")
    if count <= 0 or token_start < start or token_start + count > end:
        raise InvalidRequest(f"layer {layer}: chunk tokens [{token_start}, {token_start + count}) lie outside the expected range [{start}, {end})")
    shape = (spec.num_kv_heads, count, spec.head_dim)
    expected = shape[0] * shape[1] * shape[2] * element_size(dtype_code)
    if len(keys) != expected or len(values) != expected:
        raise InvalidRequest(
            f"layer {layer}: keys/values of {len(keys)}/{len(values)} bytes do not match shape "
            f"[H_kv={shape[0]}, n={count}, D={shape[2]}] of {spec.dtype} ({expected} bytes each)"
        )
    bias_array = None
    if has_bias:
        if bias is None or len(bias) != 4 * shape[0] * count:
            raise InvalidRequest(f"layer {layer}: session has biases, expected {4 * shape[0] * count} bytes of float32 [H_kv, n], got {0 if bias is None else len(bias)}")
        bias_array = np.frombuffer(bias, dtype="<f4").reshape(shape[:2])
    elif bias is not None and len(bias):
        raise InvalidRequest(f"layer {layer}: chunk carries a bias but the header did not set has_bias")
    raw = RAW_DTYPES[dtype_code]
    return np.frombuffer(keys, dtype=raw).reshape(shape), np.frombuffer(values, dtype=raw).reshape(shape), bias_array


class KVPieces:
    """KV of tokens [start, end) for every layer of ``spec``, gathered from pieces."""

    def __init__(self, spec: ModelSpec, start: int, end: int, has_bias: bool):
        self.spec = spec
        self.start = start
        self.end = end
        self.has_bias = has_bias
        self.dtype_code = DTYPE_CODES[spec.torch_dtype]
        self._pieces: list[list[_Piece]] = [[] for _ in range(spec.num_layers)]
        self._starts: list[list[int]] = [[] for _ in range(spec.num_layers)]
        self.num_pieces = 0
        self.bytes_received = 0

    def add(self, layer: int, token_start: int, count: int, dtype_code: int, keys, values, bias=None) -> None:
        """Add one piece. keys/values: bytes-like [H, n, D] raw little-endian; bias float32 [H, n]."""
        keys_array, values_array, bias_array = check_piece(self.spec, self.dtype_code, self.has_bias, self.start, self.end, layer, token_start, count, dtype_code, keys, values, bias)
        self._insert(layer, _Piece(token_start, count, keys_array, values_array, bias_array))
        self.bytes_received += 2 * keys_array.nbytes

    def add_tensors(self, layer: int, token_start: int, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Add one piece from tensors keys/values [H, n, D] (bias [H, n]) in process."""
        if keys.dim() != 3 or keys.shape != values.shape:
            raise InvalidRequest(f"layer {layer}: keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be [H_kv, n, D]")
        if keys.dtype not in DTYPE_CODES or values.dtype != keys.dtype:
            raise InvalidRequest(f"layer {layer}: unsupported dtypes {keys.dtype}/{values.dtype}; use float32, float16 or bfloat16")
        if keys.shape[0] != self.spec.num_kv_heads or keys.shape[2] != self.spec.head_dim:
            raise InvalidRequest(f"layer {layer}: keys of shape {tuple(keys.shape)} do not match [H_kv={self.spec.num_kv_heads}, n, D={self.spec.head_dim}]")
        bias_bytes = None
        if bias is not None:
            bias_bytes = memoryview(np.ascontiguousarray(bias.detach().to("cpu", torch.float32).numpy())).cast("B")
        self.add(
            layer,
            token_start,
            int(keys.shape[1]),
            DTYPE_CODES[keys.dtype],
            memoryview(tensor_raw_view(keys)).cast("B"),
            memoryview(tensor_raw_view(values)).cast("B"),
            bias_bytes,
        )

    def _insert(self, layer: int, piece: _Piece) -> None:
        starts = self._starts[layer]
        index = bisect.bisect_left(starts, piece.start)
        pieces = self._pieces[layer]
        if index < len(pieces) and pieces[index].start == piece.start:
            raise InvalidRequest(f"layer {layer}: two chunks start at token {piece.start}")
        starts.insert(index, piece.start)
        pieces.insert(index, piece)
        self.num_pieces += 1

    def check_complete(self) -> None:
        """Every layer must cover [start, end) exactly once; raises InvalidRequest otherwise."""
        for layer, pieces in enumerate(self._pieces):
            cursor = self.start
            for piece in pieces:
                if piece.start != cursor:
                    problem = "overlap" if piece.start < cursor else "gap"
                    raise InvalidRequest(f"layer {layer}: chunks have a {problem} at token {min(cursor, piece.start)}; each token must be sent exactly once")
                cursor = piece.start + piece.count
            if cursor != self.end:
                raise InvalidRequest(
                    f"layer {layer}: chunks cover tokens [{self.start}, {cursor}) of [{self.start}, {self.end}); "
                    "the stream ended early or chunks are missing, nothing was stored"
                )

    def views(self, layer: int, start: int, count: int) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]:
        """The pieces' parts covering tokens [start, start + count) of one layer, without a copy:
        (first token, keys [H, n, D] raw bits, values [H, n, D], bias float32 [H, n] or None),
        possibly strided views into the pieces."""
        pieces = self._pieces[layer]
        index = bisect.bisect_right(self._starts[layer], start) - 1
        parts = []
        end = start + count
        while index < len(pieces) and pieces[index].start < end:
            piece = pieces[index]
            lo, hi = max(start, piece.start) - piece.start, min(end, piece.end) - piece.start
            parts.append((piece.start + lo, piece.keys[:, lo:hi], piece.values[:, lo:hi], None if piece.bias is None else piece.bias[:, lo:hi]))
            index += 1
        return parts

    def block(self, layer: int, start: int, count: int) -> tuple[memoryview, memoryview, memoryview | None]:
        """Raw payload (keys, values, bias) of tokens [start, start + count) of one layer."""
        pieces = self._pieces[layer]
        index = bisect.bisect_right(self._starts[layer], start) - 1
        first = pieces[index]
        if first.start == start and first.count == count:
            parts = [first.keys, first.values, first.bias]
        else:
            gathered: list[list[np.ndarray]] = [[], [], []]
            end = start + count
            while index < len(pieces) and pieces[index].start < end:
                piece = pieces[index]
                lo, hi = max(start, piece.start) - piece.start, min(end, piece.end) - piece.start
                gathered[0].append(piece.keys[:, lo:hi])
                gathered[1].append(piece.values[:, lo:hi])
                if piece.bias is not None:
                    gathered[2].append(piece.bias[:, lo:hi])
                index += 1
            parts = [np.concatenate(g, axis=1) if g else None for g in gathered]
        keys, values, bias = (None if p is None else memoryview(np.ascontiguousarray(p)).cast("B") for p in parts)
        return keys, values, bias

