"""Model spec: which model (and KV layout) a cache belongs to.

A cache computed by one model is garbage in another, so every session records the spec it was
computed with and a restore into a different spec is refused, naming the fields that differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import InvalidRequest, ModelMismatch

# Wire/storage dtype codes. The numbers are persisted: never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; raises InvalidRequest for unsupported names."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise InvalidRequest(f"unsupported KV dtype {name!r}; use one of {sorted(DTYPE_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    for name, value in DTYPE_NAMES.items():
        if value == dtype:
            return name
    raise InvalidRequest(f"unsupported KV dtype {dtype}; use float32, float16 or bfloat16")


@dataclass(frozen=True)
class ModelSpec:
    """Identity and KV layout of a causal LM.

    name:         stable model name (never a local path), e.g. "smollm2-135m-instruct"
    num_layers:   L, decoder layers
    num_kv_heads: H, key/value heads per layer
    head_dim:     D, dimension of one head
    dtype:        KV element type name: "float32", "float16" or "bfloat16"
    rope_json:    canonical JSON of the rotary settings (theta, scaling); "" if none
    max_position: the model's context window
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    rope_json: str = ""
    max_position: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidRequest("model spec needs a name (e.g. 'smollm2-135m-instruct')")
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0 or value > 65535:
                raise InvalidRequest(f"model spec {field} must be an integer in 1..65535, got {value!r}")
        dtype_from_name(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys plus values for one token over all layers."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(**data)

    def digest(self) -> bytes:
        """16-byte blake2b of the canonical JSON; part of every chunk key."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(canonical, digest_size=16, person=b"kvmem-spec").digest()

    def differences(self, other: "ModelSpec") -> list[str]:
        """Human-readable list of fields that differ, e.g. ["num_layers: 30 != 24"]."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: stored {mine[key]!r} != requested {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]

    def require_same(self, requested: "ModelSpec", what: str) -> None:
        """Raise ModelMismatch naming every differing field unless ``requested`` equals self."""
        diffs = self.differences(requested)
        if diffs:
            raise ModelMismatch(
                f"{what} was stored for a different model ({'; '.join(diffs)}); "
                "restore it into the model it was computed with, or recompute the prefill"
            )

    @classmethod
    def from_model(cls, model: Any, name: str | None = None, dtype: torch.dtype | None = None) -> "ModelSpec":
        """Spec of a transformers causal LM (reads its config; KV dtype defaults to the model's)."""
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None)
        if rope is None:
            rope = {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None)}
        kv_dtype = dtype or next(model.parameters()).dtype
        return cls(
            name=name or model.config.name_or_path or config.model_type,
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype_name(kv_dtype),
            rope_json=json.dumps(rope, sort_keys=True, separators=(",", ":"), default=str),
            max_position=getattr(config, "max_position_embeddings", 0) or 0,
        )
