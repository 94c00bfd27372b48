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

import json
import os
import struct
import threading
import weakref
from pathlib import Path
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


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (a single file or a sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def checkpoint_weights_fingerprint(folder: str | os.PathLike[str], dtype: torch.dtype) -> str:
    """The fingerprint ``weights_fingerprint(model)`` gives the model that
    ``AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)`` loads, read from the checkpoint.

    For servers that never hold a transformers model (the vLLM connector): the model is built on
    the meta device for its state_dict order and tied weights, and each tensor is read from the
    safetensors files one at a time, cast to ``dtype`` as from_pretrained casts it. So a KV
    saved by vLLM and one saved by the transformers client carry one spec. Raises ValueError
    when a state_dict entry has no tensor in the files (a renamed or computed weight): pass the
    fingerprint explicitly then.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    files = _checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    entries = skeleton.state_dict(keep_vars=True)  # name -> meta tensor; tied names share one object
    aliases: dict[int, list[str]] = {}
    for name, tensor in entries.items():
        aliases.setdefault(id(tensor), []).append(name)
    digest = xxhash.xxh3_128()
    digest.update(FINGERPRINT_VERSION)
    handles: dict[Path, Any] = {}
    try:
        for name, meta in entries.items():
            source = next((alias for alias in [name, *aliases[id(meta)]] if alias in files), None)
            if source is None:
                raise ValueError(f"{folder}: weight {name!r} is not in the checkpoint files (renamed or computed at load); "
                                 "give the weights fingerprint explicitly")
            path = files[source]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt").__enter__()
            tensor = handles[path].get_tensor(source).to(meta.dtype)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise ValueError(f"{folder}: weight {source!r} has shape {tuple(tensor.shape)}, the model expects {tuple(meta.shape)}")
            _update_str(digest, name)
            _update_str(digest, str(tensor.dtype))
            digest.update(struct.pack(f"<I{tensor.dim()}q", tensor.dim(), *tensor.shape))
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return digest.hexdigest()
