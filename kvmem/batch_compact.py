"""Compacting many stored sessions, one at a time per worker: what to do (Job), what became of each
session (Outcome, Tally), and the two ways to do it: through a kvmem server (ClientCompactor, the
server computes) or over a shared store in this process (StoreCompactor, this process computes).

Both skip a session whose default compacted id exists, so a rerun resumes. Imports only the
standard library and ``compaction.naming`` at import time: ``kvmem compact`` runs from a client-only
install; StoreCompactor imports the server packages when it is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compaction.naming import COMPACTION_LABEL, compacted_id, option_value

COMPACTED, SKIPPED, FAILED = "compacted", "skipped", "failed"


@dataclass(frozen=True)
class Job:
    """What to do to every session: a method, exactly one of ratio or budget, method options as
    spelled on the command line (strings; they name the default target id)."""

    method: str
    ratio: float | None = None
    budget: int | None = None
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.budget is None):
            raise ValueError("give exactly one of ratio or budget")

    def destination(self, session_id: str) -> str:
        """The default id of the compacted copy (the server's, ``compaction.naming.compacted_id``)."""
        return compacted_id(session_id, self.method, self.ratio, self.budget, self.options)


@dataclass(frozen=True)
class Outcome:
    """What became of one session."""

    session_id: str
    status: str  # COMPACTED, SKIPPED or FAILED
    destination: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    kept_tokens: float = 0.0
    seconds: float = 0.0
    heldout_attention_error: float = -1.0  # -1: no held-out queries
    error: str = ""

    @classmethod
    def failure(cls, session_id: str, exc: BaseException) -> "Outcome":
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return cls(session_id, FAILED, error=f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": "))

    def line(self) -> str:
        if self.status == SKIPPED:
            return f"{self.session_id}: already compacted as {self.destination}, skipped"
        if self.status == FAILED:
            return f"{self.session_id}: FAILED: {self.error}"
        error = f", held-out attention error {self.heldout_attention_error:.3f}" if self.heldout_attention_error >= 0 else ""
        return (f"{self.session_id} -> {self.destination}: {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB, "
                f"{self.kept_tokens:.1f} keys/head{error}, {self.seconds:.1f}s")


@dataclass
class Tally:
    """Counts over a batch of ``total`` sessions, and the lines that report them."""

    total: int
    compacted: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        if outcome.status == COMPACTED:
            self.compacted += 1
        elif outcome.status == SKIPPED:
            self.skipped += 1
        else:
            self.failed.append(outcome.session_id)

    def summary(self) -> str:
        named = ", ".join(self.failed[:10]) + (f" and {len(self.failed) - 10} more" if len(self.failed) > 10 else "")
        failed = f", {len(self.failed)} failed ({named})" if self.failed else ""
        return f"done: {self.compacted} compacted, {self.skipped} already done{failed}, {self.total} sessions"

    def interrupted(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return f"interrupted after {self.compacted} compacted, {self.skipped} skipped{failed}; run the same command again to resume"


class ClientCompactor:
    """Compacts through a kvmem server (``kvmem.client.Client``): the server loads, computes and stores."""

    def __init__(self, client):
        self.client = client

    @classmethod
    def to(cls, address: str, **client_options) -> "ClientCompactor":
        """One for the server at ``address`` (``client_options``: kvmem.client.Client's keywords)."""
        from kvmem.client import Client

        return cls(Client(address, **client_options))

    def sessions(self) -> list[str]:
        """Every uncompacted session of the client's tenant."""
        return [info.session_id for info in self.client.list() if COMPACTION_LABEL not in info.labels]

    def compact(self, job: Job, session_id: str) -> Outcome:
        """Compact one session unless its compacted copy exists; kvmem errors propagate."""
        from kvstore.errors import NotFound

        destination = job.destination(session_id)
        try:
            self.client.get(destination)
            return Outcome(session_id, SKIPPED, destination)
        except NotFound:
            pass
        r = self.client.compact(session_id, job.method, ratio=job.ratio or 0.0, budget=job.budget or 0, options=job.options)
        return Outcome(session_id, COMPACTED, r.session.session_id, r.bytes_before, r.bytes_after, r.kept_tokens, r.seconds, r.heldout_attention_error)


@dataclass(frozen=True)
class StoreWorkerConfig:
    """How a worker process reaches the shared store and which model it hosts for the methods that
    need reference queries. ``store``: a kvstore.store.StoreConfig (the Redis backend, to share).
    ``threads``: torch threads per worker, set explicitly so results do not depend on the machine."""

    store: object
    tenant: str = "default"
    model: str = ""  # "" = host none (methods that need reference queries then fail)
    model_cache_dir: Path = Path("data/models")
    threads: int = 1

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")


class StoreCompactor:
    """Compacts in this process over a shared store (``compaction.service.compact_session``): it
    loads the session, makes reference queries with its own model when the method needs them (loaded
    on first use; never for methods that need none), computes, and stores atomically."""

    def __init__(self, config: StoreWorkerConfig):
        import torch

        from kvstore.store import SessionStore

        torch.set_num_threads(config.threads)
        self.config = config
        self.store = SessionStore.open(config.store)
        self._host = None

    def close(self) -> None:
        self.store.close()

    def host(self, method: str):
        """The hosted model for ``method``, or None when it needs none (or none is configured)."""
        from compaction.service import QUERY_METHODS_WITHOUT_HOST

        if method in QUERY_METHODS_WITHOUT_HOST or not self.config.model:
            return None
        if self._host is None:
            from modelhost.host import ModelHost

            self._host = ModelHost(self.config.model, self.config.model_cache_dir)
        return self._host

    def sessions(self) -> list[str]:
        """Every uncompacted, undamaged session of the tenant."""
        from kvstore.records import SessionRecord

        found, token = [], ""
        while True:
            page, token = self.store.list(self.config.tenant, page_size=1000, page_token=token)
            found += [r.session_id for r in page if isinstance(r, SessionRecord) and COMPACTION_LABEL not in r.labels]
            if not token:
                return found

    def compact(self, job: Job, session_id: str) -> Outcome:
        """Compact one session unless its compacted copy exists; kvmem errors propagate."""
        from compaction.base import Target
        from compaction.service import compact_session
        from kvstore.errors import NotFound

        destination = job.destination(session_id)
        try:
            self.store.get(self.config.tenant, destination)
            return Outcome(session_id, SKIPPED, destination)
        except NotFound:
            pass
        target = Target(ratio=job.ratio) if job.ratio is not None else Target(budget=job.budget)
        r = compact_session(self.store, self.host(job.method), self.config.tenant, session_id, job.method, target,
                            options={key: option_value(value) for key, value in job.options.items()}, name_options=dict(job.options))
        return Outcome(session_id, COMPACTED, r.record.session_id, r.bytes_before, r.bytes_after, r.kept_tokens, r.seconds, r.heldout_attention_error)
