"""Service configuration: frozen dataclasses loaded once from TOML, KVMEM_* env and flags.

Precedence: defaults < TOML file < environment (KVMEM_<SECTION>_<KEY>, e.g. KVMEM_SERVER_PORT)
< command-line overrides (``section.key=value``). Unknown sections or keys anywhere stop
start-up with an error that names them.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kvstore.store import StoreConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# KVMEM_* variables that are not server settings: the config file path, and what the CLI and
# tests read (a token in the environment must never stop a server from starting)
CLIENT_ENVIRONMENT = frozenset({"KVMEM_CONFIG", "KVMEM_TOKEN", "KVMEM_ADDRESS", "KVMEM_TLS_CA", "KVMEM_TLS_CERT", "KVMEM_TLS_KEY", "KVMEM_TEST_MODEL_CACHE"})


class ConfigError(ValueError):
    """Configuration that must stop start-up (unknown key, bad value)."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # bind address; beyond loopback needs [auth] and [tls] (or insecure)
    port: int = 50051  # 0 = pick a free port (printed, and written to port_file if set)
    port_file: str = ""  # write the bound port here once serving (for scripts and tests)
    max_workers: int = 16  # threads for CPU and disk work (open streams wait on the event loop, not here)
    max_message_bytes: int = 16 << 20  # per message, both directions; KV streams use <= 2 MiB chunks
    grace_seconds: float = 30.0  # on SIGTERM/SIGINT: stop accepting, let in-flight calls finish
    maintenance_seconds: float = 30.0  # how often expired sessions are collected
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR
    log_format: str = "json"  # "json" (one object per line) or "text"
    insecure: bool = False  # allow a non-loopback host without auth and TLS (logged as INSECURE at every start)
    stream_idle_timeout_s: float = 30.0  # a stream silent this long is ended (DEADLINE_EXCEEDED)
    max_streams_per_tenant: int = 64  # concurrent Save/Append/Restore/Retrieve streams
    max_streams_per_connection: int = 32  # the same, per client connection
    max_reference_bytes: int = 1 << 30  # reference queries one CompactStream call may send (held until compaction runs)
    max_concurrent_rpcs: int = 4096  # all calls in flight; more are refused by gRPC (RESOURCE_EXHAUSTED)
    reflection: bool = True  # gRPC server reflection (grpcurl lists and calls the service); no data, only the schema


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # bundled name, or a path to a transformers causal LM folder
    cache_dir: str = ""  # where the bundled GGUF is converted once; "" = <store.data_dir>/models
    prepare: bool = True  # make the model available (convert the bundled GGUF) at start-up
    reference_cache_bytes: int = 256 << 20  # reference queries the model made for compaction, kept per session for the next one (0 = off)


@dataclass(frozen=True)
class RetrievalSettings:
    index_on_save: bool = True  # build a session's block index in the background after save/append
    block_tokens: int = 64  # tokens per retrievable KV block
    representatives: int = 4  # representative keys per block and KV head
    exact_max_vectors: int = 1 << 15  # per (layer, head) index; HNSW above (bench/retrieval_latency.py)
    sink_tokens: int = 4  # always-kept first tokens
    recent_tokens: int = 256  # always-kept last tokens (at most a quarter of the budget)
    text_search: bool = True  # SearchText with the bundled all-MiniLM-L6-v2 (loaded on first use)
    index_cache_bytes: int = 1 << 30  # block indexes kept in memory between requests (LRU; a 256k-token session's is ~460 MB with its int8 codes)
    int8_first_scan: bool = True  # Retrieve on indexes of 32k+ vectors per head (512k+ tokens at a 2k budget): int8 scan, then exact scores near the cut (same blocks, 1.5-1.7x faster at 512k, ~2x at 1M: bench/coarse_scan.py)


@dataclass(frozen=True)
class PlannerSettings:
    model_path: str = ""  # fitted planner model (cost curves + quality tables); "" = the bundled one
    tolerance: float = 0.05  # take the cheapest option within this much of the best expected quality
    rag_budget_tokens: int = 1024  # context tokens of text chunks for rag
    kv_budget_tokens: int = 2048  # context tokens per layer for kv_retrieval
    compact_method: str = "streaming_llm"  # compacted option: method and kept ratio (made on first use)
    compact_ratio: float = 0.5  # kept ratio of compact_method
    recall_budget_tokens: int = 256  # compacted_recall: exact tokens per layer recalled from the lossless original (bench/recall.py)
    recall_double_count: str = "drop_scale"  # compacted_recall: none | drop | scale | drop_scale (retrieval/recall.py; bench/recall.py)
    recall_block_tokens: int = 32  # recall's own block index (one stored index with [retrieval]'s when both settings agree): tokens per block (bench/results/recall_small.md)
    recall_representatives: int = 0  # recall's index: keys scored per block and KV head; 0 = every key (exact best match; 4 missed needles at 2k-4k, bench/recall.py)
    recall_margin_tokens: int = 8  # each recalled block is widened by this many tokens on both sides (counted in the recall budget)
    ttt_steps: int = 8  # qTTT: AdamW steps, span length, learning rate (bench/ttt_sweep.py)
    ttt_span_tokens: int = 128  # qTTT: tokens per training span
    ttt_learning_rate: float = 1e-3  # qTTT: learning rate

    def __post_init__(self) -> None:
        if not 1 <= self.recall_block_tokens <= 4096:
            raise ValueError(f"planner.recall_block_tokens must be in 1..4096, got {self.recall_block_tokens}")
        if self.recall_representatives < 0 or self.recall_margin_tokens < 0:
            raise ValueError(f"planner.recall_representatives ({self.recall_representatives}) and recall_margin_tokens "
                             f"({self.recall_margin_tokens}) must be >= 0")


@dataclass(frozen=True)
class AuthConfig:
    keys_file: str = ""  # TOML file of API keys (SHA-256 digests, never tokens; `kvmem keys add`); "" = auth off, the tenant field is trusted


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""  # PEM certificate chain of the server; with key_file turns TLS on
    key_file: str = ""  # PEM private key of the server
    client_ca_file: str = ""  # PEM CA bundle: require client certificates signed by it (mutual TLS)


@dataclass(frozen=True)
class QuotaConfig:
    """Per-tenant defaults; a key in the keys file may override them. 0 = unlimited."""

    max_stored_bytes: int = 0  # bytes of KV stored per tenant after dedup
    max_sessions: int = 0  # sessions per tenant


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False  # serve Prometheus metrics over HTTP (`make serve` turns it on)
    host: str = "127.0.0.1"  # bind address of the metrics HTTP server
    port: int = 9464  # 0 = pick a free port


@dataclass(frozen=True)
class ServiceConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if isinstance(kind, str):
        kind = {"int": int, "bool": bool, "str": str, "float": float, "Path": Path}.get(kind, kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:
        if kind is int and isinstance(value, str):
            return int(value.replace("_", ""), 0)
        if kind is int and isinstance(value, float):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}") from None


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _apply(config: ServiceConfig, updates: Mapping[str, Mapping[str, Any]], source: str) -> ServiceConfig:
    sections = _section_types(ServiceConfig)
    for section, values in updates.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}]; known: {', '.join(sorted(sections))}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table")
        current = getattr(config, section)
        types = _section_types(type(current))
        changes = {}
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"{source}: unknown key {section}.{key}; known: {', '.join(sorted(types))}")
            changes[key] = _coerce(value, types[key], f"{source}: {section}.{key}")
        try:
            config = dataclasses.replace(config, **{section: dataclasses.replace(current, **changes)})
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return config


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None, overrides: list[str] | None = None) -> ServiceConfig:
    """Build the service config. ``env`` is passed in (normally os.environ), never read here."""
    config = ServiceConfig()
    if path:
        with open(path, "rb") as handle:
            try:
                config = _apply(config, tomllib.load(handle), str(path))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    env_updates: dict[str, dict[str, str]] = {}
    for name, value in (env or {}).items():
        if not name.startswith("KVMEM_") or name in CLIENT_ENVIRONMENT:
            continue
        section, _, key = name[len("KVMEM_"):].lower().partition("_")
        if not key:
            raise ConfigError(f"environment: {name} is not KVMEM_<SECTION>_<KEY>")
        env_updates.setdefault(section, {})[key] = value
    config = _apply(config, env_updates, "environment")
    flag_updates: dict[str, dict[str, str]] = {}
    for item in overrides or []:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.partition(".")
        if not sep or not dot:
            raise ConfigError(f"flag --set {item!r}: expected section.key=value")
        flag_updates.setdefault(section, {})[key] = value
    return _apply(config, flag_updates, "flags")


# ---------------------------------------------------------------------------- reference
REFERENCE_BEGIN = "<!-- config reference: generated by `python -m kvmem.config`; do not edit by hand -->"
REFERENCE_END = "<!-- end of config reference -->"


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in a dataclass's source."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*?#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _toml_value(value: Any) -> str:
    """A default as it is written in the TOML file."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    return str(value)


def render_reference() -> str:
    """Markdown tables of every section and key with its default and meaning, from the dataclasses
    themselves (docs/operations.md embeds it; a test fails when it drifts)."""
    lines = [REFERENCE_BEGIN, ""]
    defaults = ServiceConfig()
    for section, cls in _section_types(ServiceConfig).items():
        if isinstance(cls, str):
            cls = type(getattr(defaults, section))
        comments = _field_comments(cls)
        lines += [f"**[{section}]**", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            value = _toml_value(getattr(getattr(defaults, section), f.name))
            lines.append(f"| `{f.name}` | `{value}` | {comments.get(f.name, '').replace('|', '/')} |")
        lines.append("")
    lines.append(REFERENCE_END)
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - regenerates the reference for docs/operations.md
    print(render_reference())
