"""The connector's settings (``kv_connector_extra_config``) and the model spec it derives.

Settings, all optional, as keys of ``KVTransferConfig(kv_connector_extra_config={...})``:

    kvmem_address             "127.0.0.1:50051"  the kvmem server
    kvmem_token               ""     API key (or kvmem_token_file: a file holding it)
    kvmem_tenant              ""     tenant to act as ("" = the token's; admins only otherwise)
    kvmem_tls                 ""     "" plaintext; "system" = system roots; else a CA file path
    kvmem_model_name          ""     stable model name; "" = the model folder's name (as
                                     modelhost.models.load_model names it) or the hub id
    kvmem_weights_fingerprint ""     "" = computed from the checkpoint (modelhost.fingerprint)
    kvmem_ttl_seconds         86400  expiry of the sessions the connector creates (0 = never)
    kvmem_load / kvmem_save   true   take stored prefixes / store new full blocks
    kvmem_lookup_timeout_s    2.0    the scheduler's Lookup deadline (it runs on the scheduling path)
    kvmem_timeout_s           60.0   restore and save deadlines
    kvmem_retry_after_s       5.0    after a failed Lookup, skip kvmem this long (no stall per request)
    kvmem_max_pending_save_bytes 1 GiB  KV copied out and waiting to be saved; beyond it a save is
                                     dropped (logged), so decoding never waits for kvmem

Per request, ``SamplingParams(extra_args={"kv_transfer_params": {...}})`` or the OpenAI API's
``kv_transfer_params`` may hold ``kvmem_session`` (the session to keep this request's tokens in:
created, or replaced by the longer token list, sharing the stored prefix), ``kvmem_load`` and
``kvmem_save`` (false to opt this request out).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from kvstore.spec import ModelSpec


@dataclass(frozen=True)
class ConnectorSettings:
    address: str = "127.0.0.1:50051"
    token: str = ""
    token_file: str = ""
    tenant: str = ""
    tls: str = ""
    model_name: str = ""
    weights_fingerprint: str = ""
    ttl_seconds: int = 86400
    load: bool = True
    save: bool = True
    lookup_timeout_s: float = 2.0
    timeout_s: float = 60.0
    retry_after_s: float = 5.0
    max_pending_save_bytes: int = 1 << 30

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> "ConnectorSettings":
        """Settings from ``kvmem_*`` keys; other keys are left to other connectors. Unknown
        ``kvmem_*`` keys and wrong types raise ValueError (a typo must not silently disable kvmem)."""
        known = {field.name: field for field in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in (extra or {}).items():
            if not key.startswith("kvmem_"):
                continue
            name = key[len("kvmem_"):]
            if name not in known:
                raise ValueError(f"unknown kvmem connector setting {key!r}; known: {sorted('kvmem_' + n for n in known)}")
            default = known[name].default
            if isinstance(default, bool):
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                elif not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false, got {value!r}")
            elif isinstance(default, (int, float)):
                try:
                    value = type(default)(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{key} must be a number, got {value!r}") from None
                if value < 0:
                    raise ValueError(f"{key} must not be negative, got {value!r}")
            elif not isinstance(value, str):
                raise ValueError(f"{key} must be a string, got {value!r}")
            values[name] = value
        return cls(**values)

    def api_key(self) -> str | None:
        if self.token_file:
            return Path(self.token_file).read_text().strip() or None
        return self.token or None

    def tls_option(self) -> Any:
        """What kvmem.client.Client's ``tls`` takes."""
        if not self.tls:
            return None
        return True if self.tls == "system" else self.tls


def _model_folder(model_config: Any) -> Path | None:
    """The local folder of vLLM's model: the path it was given, or the hub cache's snapshot."""
    path = Path(str(model_config.model)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_config.model), revision=getattr(model_config, "revision", None), local_files_only=True))
    except Exception:  # not in the hub cache: no folder to read the weights from
        return None


def spec_from_vllm(vllm_config: Any, settings: ConnectorSettings) -> ModelSpec:
    """The kvmem ModelSpec of the model vLLM runs: what ``ModelSpec.from_model`` gives the same
    checkpoint loaded by transformers at the same dtype (same name rule, same config reading,
    same weights fingerprint), so either side restores the other's KV.

    Refuses (ValueError, naming the setting) what the connector cannot store faithfully:
    tensor or pipeline parallelism (each worker holds a shard), a quantised KV cache dtype,
    sliding-window attention."""
    model_config, cache_config, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise ValueError("the kvmem connector supports tensor_parallel_size=1 and pipeline_parallel_size=1 only (each shard would need its own spec)")
    if cache_config.cache_dtype not in ("auto", None):
        raise ValueError(f"the kvmem connector stores float32/float16/bfloat16 KV; kv_cache_dtype={cache_config.cache_dtype!r} is not supported (use \"auto\")")
    if model_config.get_sliding_window() is not None:
        raise ValueError("the kvmem connector does not support sliding-window attention models yet")
    dtype = model_config.dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unexpected model dtype {dtype!r}")
    folder = _model_folder(model_config)
    name = settings.model_name
    if not name:
        local = Path(str(model_config.model)).expanduser()
        name = local.resolve().name if local.is_dir() else str(model_config.model)
    fingerprint = settings.weights_fingerprint
    if not fingerprint:
        if folder is None:
            raise ValueError(f"cannot read the weights of {model_config.model!r} to fingerprint them; set kvmem_weights_fingerprint")
        from modelhost.fingerprint import checkpoint_weights_fingerprint

        fingerprint = checkpoint_weights_fingerprint(folder, dtype)
    return ModelSpec.from_config(model_config.hf_text_config, name=name, dtype=dtype, weights_fingerprint=fingerprint)

