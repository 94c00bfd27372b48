"""The model a server hosts (for compaction queries, retrieval and the planner), loaded on first use."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
from pathlib import Path
from typing import Any, Iterator

from kvstore.errors import ModelMismatch
from modelhost.fingerprint import weights_fingerprint
from kvstore.spec import ModelSpec


def host_differences(host_spec: ModelSpec, spec: ModelSpec) -> list[str]:
    """Fields in which ``spec`` (a stored session's) differs from the hosted model's spec, for
    deciding whether the hosted model may run on that session.

    An empty weights_fingerprint means "unknown" here and matches any: sessions saved by clients
    that built their spec by hand (or by versions before fingerprints) stay usable by the hosted
    model of the same name and shapes. This leniency is only for the host's own check; chunk
    keys, spec digests and restores still compare every field exactly, so KV saved with and
    without a fingerprint is never shared or mixed.
    """
    if not spec.weights_fingerprint or not host_spec.weights_fingerprint:
        spec = dataclasses.replace(spec, weights_fingerprint=host_spec.weights_fingerprint)
    return host_spec.differences(spec)


class ModelHost:
    """Lazily loads one causal LM; ``use()`` serialises inference on it (one request at a time)."""

    def __init__(self, name_or_path: str, cache_dir: Path, device: str = "cpu"):
        self.name_or_path = name_or_path
        self.cache_dir = Path(cache_dir)
        self.device = device
        self._loaded: tuple[Any, Any] | None = None
        self._spec: ModelSpec | None = None
        self._load_lock = threading.Lock()
        self._use_lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._load_lock:
            if self._loaded is None:
                from modelhost.models import load_model

                model, tokenizer = load_model(self.name_or_path, cache_dir=self.cache_dir, device=self.device)
                weights_fingerprint(model)  # fingerprint the weights as loaded, before any request can adapt them
                self._spec = ModelSpec.from_model(model)
                from retrieval.rope import Rope

                self._rope = Rope.from_model(model)  # fixed by the config: read without the use lock
                self._window = int(model.config.get_text_config().max_position_embeddings)
                self._loaded = (model, tokenizer)
                # the model and the modules its load imported live as long as the host: out of the
                # collector's sight, as server.main does at start (a full collection walking them
                # paused a Retrieve by ~100 ms in bench/retrieve_e2e.py)
                gc.collect()
                gc.freeze()
            return self._loaded

    def rope(self) -> Any:
        """The hosted model's RoPE (retrieval.rope.Rope), without waiting for the model to be free."""
        self._load()
        return self._rope

    def window(self) -> int:
        """The hosted model's context window in tokens."""
        self._load()
        return self._window

    def might_host(self, spec: ModelSpec) -> bool:
        """Cheap check for background work: the full compatibility check (``host_differences``)
        once the model is loaded; before that, only whether the names agree (so a session of
        another model never triggers a load)."""
        if self._loaded is not None:
            return not host_differences(self.spec, spec)
        return Path(spec.name).name == Path(self.name_or_path).name

    def accepts(self, spec: ModelSpec) -> bool:
        """True if the hosted model may run on a session of ``spec`` (loads the model when the
        names agree). Use this rather than ``host.spec == spec``: see ``host_differences``."""
        return self.might_host(spec) and not host_differences(self.spec, spec)

    @property
    def spec(self) -> ModelSpec:
        """The hosted model's spec (weights_fingerprint included), computed once at load."""
        self._load()
        return self._spec

    def require_spec(self, spec: ModelSpec, what: str, need: str = "to compute reference queries", hint: str = "supply reference queries instead") -> None:
        """Raise ModelMismatch unless this host runs the model ``spec`` describes (an unknown
        weights_fingerprint in ``spec`` matches; see ``host_differences``)."""
        if self._loaded is None and not self.might_host(spec):  # another model's name: refuse without loading this one
            raise ModelMismatch(
                f"{what} needs the session's model {need}, but this server hosts {Path(self.name_or_path).name!r}, "
                f"not {spec.name!r}; {hint}"
            )
        host_spec = self.spec
        diffs = host_differences(host_spec, spec)
        if diffs:
            raise ModelMismatch(
                f"{what} needs the session's model {need}, but this server hosts "
                f"{host_spec.name!r} ({'; '.join(diffs)}); {hint}"
            )

    @contextlib.contextmanager
    def use(self) -> Iterator[tuple[Any, Any]]:
        model, tokenizer = self._load()
        with self._use_lock:
            yield model, tokenizer
