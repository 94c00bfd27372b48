"""Model spec: which model (and KV layout) a cache belongs to.

A cache computed by one model is garbage in another, so every session records the spec it was
computed with and a restore into a different spec is refused, naming the fields that differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.errors import InvalidRequest, ModelMismatch

# Wire/storage dtype codes. The numbers are persisted: never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

MAX_POSITION_LIMIT = 1 << 62  # positions, logical lengths and max_position stay below/at 2^62
MAX_FINGERPRINT_CHARS = 128
MAX_ROPE_JSON_BYTES = 65536
_HEX = re.compile(r"[0-9a-f]*")


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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _normalise_json(value: Any) -> Any:
    """Numbers in canonical form: integral floats become ints, NaN/Infinity are refused."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {key: _normalise_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalise_json(item) for item in value]
    return value


def canonical_rope_json(text: str) -> str:
    """The canonical form of a rotary-settings JSON text; "" stays "".

    Sorted keys, compact separators, ASCII escapes, and numbers normalised: an integral float
    (10000.0) becomes an int (10000), other floats keep their shortest ``repr``; NaN and
    Infinity are refused. So ``{"theta":10000}`` and ``{"theta": 10000.0}`` are one model.
    Raises InvalidRequest for text that is not a JSON object (or null).
    """
    if not isinstance(text, str):
        raise InvalidRequest(f"rope_json must be a string of JSON, got {type(text).__name__}")
    if text == "":
        return ""
    try:
        value = _normalise_json(json.loads(text, parse_constant=_reject_constant))
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"its top level is a {type(value).__name__}, not an object")
        canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"rope_json is not JSON: {exc}; send a JSON object such as {{\"rope_theta\":10000}}, or \"\" for none") from None
    if len(canonical) > MAX_ROPE_JSON_BYTES:
        raise InvalidRequest(f"rope_json is {len(canonical)} bytes in canonical form; the limit is {MAX_ROPE_JSON_BYTES}")
    return canonical


@dataclass(frozen=True)
class ModelSpec:
    """Identity and KV layout of a causal LM.

    name:         stable model name (never a local path), e.g. "smollm2-135m-instruct"
    num_layers:   L, decoder layers
    num_kv_heads: H, key/value heads per layer
    head_dim:     D, dimension of one head
    dtype:        KV element type name: "float32", "float16" or "bfloat16"
    rope_json:    JSON object of the rotary settings (theta, scaling), kept in canonical form
                  (see ``canonical_rope_json``); "" if none
    max_position: the model's context window, 1..2^62 (0 only in records of older versions)
    weights_fingerprint: lowercase hex digest of the model's weights (``from_model`` fills it
                  with ``modelhost.fingerprint.weights_fingerprint``); "" = unknown
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    rope_json: str = ""
    max_position: int = 0
    weights_fingerprint: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidRequest("model spec needs a name (e.g. 'smollm2-135m-instruct')")
        try:
            self.name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("model spec name is not valid Unicode text (it holds a lone surrogate); send UTF-8") from None
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value > 65535:
                raise InvalidRequest(f"model spec {field} must be an integer in 1..65535, got {value!r}")
        if not isinstance(self.dtype, str):
            raise InvalidRequest(f"model spec dtype must be a name such as 'float32', got {self.dtype!r}")
        dtype_from_name(self.dtype)
        value = self.max_position
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_POSITION_LIMIT:
            raise InvalidRequest(f"model spec max_position must be an integer in 1..2^62 (the model's context window; 0 only in old records), got {value!r}")
        fingerprint = self.weights_fingerprint
        if not isinstance(fingerprint, str) or len(fingerprint) > MAX_FINGERPRINT_CHARS or not _HEX.fullmatch(fingerprint):
            raise InvalidRequest(
                f"model spec weights_fingerprint must be lowercase hex of at most {MAX_FINGERPRINT_CHARS} characters "
                f"(modelhost.fingerprint.weights_fingerprint(model)), or \"\" when unknown; got {str(fingerprint)[:40]!r}"
            )
        object.__setattr__(self, "rope_json", canonical_rope_json(self.rope_json))

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
        """Inverse of ``to_dict``; accepts dicts stored by older versions (no weights_fingerprint)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"model spec has unknown fields {unknown}; this kvmem knows {sorted(known)}")
        return cls(**data)

    def digest(self) -> bytes:
        """16-byte blake2b of the canonical JSON of every field; part of every chunk key.

        An unknown (empty) weights_fingerprint is left out of the hashed JSON, so a spec without
        one has the digest older versions gave it (their stored chunk keys still match); a set
        fingerprint is hashed like every other field, so two checkpoints never share KV.
        """
        fields = self.to_dict()
        if not fields["weights_fingerprint"]:
            del fields["weights_fingerprint"]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
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
        """Spec of a transformers causal LM (reads its config; KV dtype defaults to the model's).

        weights_fingerprint is the digest of the model's weights, computed once per model object
        (see ``modelhost.fingerprint``); rope_json goes through the same canonical form as any spec.
        """
        from modelhost.fingerprint import weights_fingerprint  # a model's identity, computed where models live

        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        return cls.from_config(
            config, name=name or model.config.name_or_path or config.model_type,
            dtype=dtype or next(model.parameters()).dtype, weights_fingerprint=weights_fingerprint(model),
        )

    @classmethod
    def from_config(cls, config: Any, *, name: str, dtype: torch.dtype, weights_fingerprint: str = "") -> "ModelSpec":
        """Spec from a transformers (text) config: the one reading of a config, shared by
        ``from_model`` and the vLLM connector (which has vLLM's copy of the same config), so both
        give one model one spec and their KV is interchangeable."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None)
        if rope is None:
            rope = {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None)}
        return cls(
            name=name,
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype_name(dtype),
            rope_json=json.dumps(rope, sort_keys=True, separators=(",", ":"), default=str),
            max_position=getattr(config, "max_position_embeddings", 0) or 0,
            weights_fingerprint=weights_fingerprint,
        )
