"""The one error hierarchy of kvmem.

Every failure a caller can act on is one of these; ``server.py`` maps each class to a gRPC
status code in a single table. Messages say what went wrong *and* what to do about it.
"""
from __future__ import annotations


class KvmemError(Exception):
    """Base class of all kvmem errors."""


class NotFound(KvmemError):
    """A session (or a block it needs) does not exist, or has expired."""


class AlreadyExists(KvmemError):
    """A session with this id exists and the request did not ask to overwrite it."""


class InvalidRequest(KvmemError):
    """The request itself is malformed: wrong shapes, dtypes, ranges, ids."""


class FailedPrecondition(KvmemError):
    """The request is well-formed but does not fit the session's state (e.g. already compacted)."""


class ModelMismatch(FailedPrecondition):
    """The stored cache belongs to a different model spec than the caller's."""


class Conflict(KvmemError):
    """The session changed under the request (optimistic concurrency check failed)."""


class CapacityExceeded(KvmemError):
    """A configured limit (LMDB ceiling, disk, session size) would be exceeded."""


class CorruptData(KvmemError):
    """Stored bytes failed their integrity check; they are never returned as data."""


class Unavailable(KvmemError):
    """The store is closed or shutting down; retry on another replica or later."""


class Unauthenticated(KvmemError):
    """The call carries no credentials, or credentials the server does not know."""


class PermissionDenied(KvmemError):
    """The caller is known but may not act for the tenant the request names."""


class TimedOut(KvmemError):
    """A stream stayed silent past the server's idle limit; its partial data was dropped."""
