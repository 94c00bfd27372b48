"""A digest of a model's weights: two checkpoints with one name and one shape never share KV.

``weights_fingerprint(model)`` hashes every parameter and persistent buffer of
``model.state_dict()`` in its order: for each tensor its name, dtype and shape, then its raw
bytes (bit patterns, so bf16 and -0.0 are exact), with xxh3-128. It is computed once per model
object and cached against that object (a WeakKeyDictionary, so a ``copy.deepcopy`` whose
weights are then changed gets its own fingerprint); a model whose weights are changed in place
and not restored keeps its old fingerprint, so compute it before adapting weights (ModelHost
does it right after loading).
"""
from __future__ import annotations

import struct
import threading
import weakref
from typing import Any

import torch
import xxhash

FINGERPRINT_VERSION = b"kvmem-weights-v1"
_CACHE: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _update_str(digest: "xxhash.xxh3_128", text: str) -> None:
    data = text.encode()
    digest.update(struct.pack("<I", len(data)) + data)


def compute_weights_fingerprint(model: Any) -> str:
    """The fingerprint, computed now (no cache): lowercase hex of 32 characters."""
    digest = xxhash.xxh3_128()
    digest.update(FINGERPRINT_VERSION)
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue  # extra state objects carry no weights
        _update_str(digest, name)
        _update_str(digest, str(tensor.dtype))
        digest.update(struct.pack(f"<I{tensor.dim()}q", tensor.dim(), *tensor.shape))
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # bit patterns [nbytes]
        digest.update(raw.numpy().data)
    return digest.hexdigest()


def weights_fingerprint(model: Any) -> str:
    """Hex digest of the model's weights, computed once per model object and then cached."""
    with _LOCK:
        cached = _CACHE.get(model)
        if cached is None:
            cached = compute_weights_fingerprint(model)
            _CACHE[model] = cached
        return cached
