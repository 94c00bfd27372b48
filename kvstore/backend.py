"""The storage seam: what every durable backend of kvmem provides.

A backend holds named *spaces* of byte keys to byte values, changed only inside write
transactions. The store above it (``kvstore.store``) keeps everything in these spaces:

    blocks    chunk key (16) + layer (BE16)            -> block record (immutable, content-addressed)
    staged    chunk key (16) + owner (16)              -> staging time (BE64 ms): blocks being written
    refs      chunk key (16)                           -> refcount u32, layers u32, record bytes u64
    sessions  tenant \\0 session id                     -> session record (compare-and-set on version)
    aux       session key \\1 name                      -> data attached to a session
    ttl       expires_at_ms (BE64) + session key       -> b""
    usage     tenant                                   -> JSON usage and catalogue digest
    meta      name                                     -> small JSON

Contract (``tests/test_backend_contract.py`` checks every backend against it):

* ``read()`` gives a consistent snapshot; ``scan`` walks keys in byte order.
* ``write(fn)`` runs ``fn(txn)`` atomically; when it returns, the change is durable (the
  explicit commit point). If ``fn`` raises, nothing of it is stored and the error propagates.
  ``fn`` may be run more than once (a backend may retry it from scratch), so it must have no
  side effects outside ``txn``. Concurrent ``write`` calls may share one durable commit (group
  commit), each still atomic on its own.
* Blocks are immutable and content-addressed: ``put_blocks`` stores only the keys that are
  absent (put-if-absent), outside any session commit; the session record written last is what
  makes them visible (see ``kvstore.staging``).
* Damage the backend can detect is raised as ``CorruptData`` naming what is damaged; a
  backend never returns bytes it knows to be wrong.

Session records carry their own version; ``kvstore.store`` compares it inside the write
transaction before replacing a record (compare-and-set). Listing is by tenant prefix with
paging over ``scan``.
"""
from __future__ import annotations

from typing import Callable, ContextManager, Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")
SPACES = ("sessions", "blocks", "refs", "ttl", "meta", "aux", "usage", "staged")


class ReadTxn(Protocol):
    def get(self, space: str, key: bytes) -> bytes | memoryview | None:
        """The value under ``key``, or None. Views are valid only inside the transaction."""

    def scan(self, space: str, start: bytes = b"", prefix: bytes = b"", values: bool = True) -> Iterator[tuple[bytes, memoryview | None]]:
        """(key, value) pairs in key order from ``start``, while keys begin with ``prefix``."""

    def count(self, space: str) -> int:
        """Number of entries in ``space``."""


class WriteTxn(ReadTxn, Protocol):
    def put(self, space: str, key: bytes, value: bytes | memoryview) -> None: ...

    def put_if_absent(self, space: str, key: bytes, value: bytes | memoryview) -> bool:
        """Store ``value`` unless ``key`` exists; True if it was stored."""

    def delete(self, space: str, key: bytes) -> bool:
        """Delete ``key``; True if it existed."""

    def clear(self, space: str) -> None: ...


class Pending(Protocol):
    def wait(self) -> int: ...


class Backend(Protocol):
    name: str

    def read(self) -> ContextManager[ReadTxn]: ...

    def write(self, fn: Callable[[WriteTxn], T]) -> T: ...

    def put_blocks(self, blocks: Iterable[tuple[bytes, bytes | memoryview]], staged: Iterable[tuple[bytes, bytes]] = ()) -> "Pending":
        """Queue put-if-absent of each (key, record) into ``blocks`` and each (key, value) into
        ``staged`` as one write, without waiting: ``.wait()`` on the result returns how many
        blocks were new once they are written (a stream fills its next batch meanwhile). The
        records are not copied: the caller leaves them unchanged until ``wait`` returns."""

    def used_bytes(self) -> int: ...

    # optional: ``confirm_replicas(receipts)``, for a backend whose block writes are not durable
    # when they return (Redis: not yet on the replicas); called once before the commit that
    # references blocks written by put_blocks, with the receipts of their Pending writes

    def capacity_bytes(self) -> int:
        """The most bytes the backend will hold (0: no limit it knows of)."""

    def snapshot(self, destination) -> None:
        """A consistent copy of everything committed, while writes go on."""

    def close(self) -> None: ...


Receipts = dict  # where a backend's block writes landed (Redis: primary (host, port) -> run_id of the process)


def merge_receipts(into: Receipts, more: Receipts) -> None:
    """Add ``more`` to ``into``; a place that answered as two different processes (a restart or a
    failover between two writes) is marked "changed", so the confirmation refuses it."""
    for where, who in more.items():
        if into.setdefault(where, who) != who:
            into[where] = "changed"
