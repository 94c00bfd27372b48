"""The model a server hosts (for compaction queries, retrieval and the planner), loaded on first use."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator

from kvstore.errors import ModelMismatch
from kvstore.spec import ModelSpec


class ModelHost:
    """Lazily loads one causal LM; ``use()`` serialises inference on it (one request at a time)."""

    def __init__(self, name_or_path: str, cache_dir: Path, device: str = "cpu"):
        self.name_or_path = name_or_path
        self.cache_dir = Path(cache_dir)
        self.device = device
        self._loaded: tuple[Any, Any] | None = None
        self._load_lock = threading.Lock()
        self._use_lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._load_lock:
            if self._loaded is None:
                from kvstore.models import load_model

                self._loaded = load_model(self.name_or_path, cache_dir=self.cache_dir, device=self.device)
            return self._loaded

    def might_host(self, spec: ModelSpec) -> bool:
        """Cheap check for background work: the exact spec once the model is loaded; before that,
        only whether the names agree (so a session of another model never triggers a load)."""
        if self._loaded is not None:
            return self.spec == spec
        return Path(spec.name).name == Path(self.name_or_path).name

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_model(self._load()[0])

    def require_spec(self, spec: ModelSpec, what: str, need: str = "to compute reference queries", hint: str = "supply reference queries instead") -> None:
        """Raise ModelMismatch unless this host runs the model ``spec`` describes."""
        host_spec = self.spec
        if host_spec != spec:
            raise ModelMismatch(
                f"{what} needs the session's model {need}, but this server hosts "
                f"{host_spec.name!r} ({'; '.join(host_spec.differences(spec))}); {hint}"
            )

    @contextlib.contextmanager
    def use(self) -> Iterator[tuple[Any, Any]]:
        model, tokenizer = self._load()
        with self._use_lock:
            yield model, tokenizer
