"""The one table between kvmem's error hierarchy and gRPC status codes (server and client).

Several classes share a code (ModelMismatch and FailedPrecondition are both FAILED_PRECONDITION),
so the server also names the class in the trailing metadata entry ``kvmem-error`` and the
client rebuilds that exact class; a peer that sends no such entry gets the class of its code.
"""
from __future__ import annotations

import grpc

from kvstore import errors

ERROR_METADATA_KEY = "kvmem-error"

# Every class a client can receive, with its status code. Subclasses come before their bases
# only for readability: lookups walk the MRO.
ERROR_CODES: dict[type[errors.KvmemError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.CorruptData: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.TimedOut: grpc.StatusCode.DEADLINE_EXCEEDED,
}
ERRORS_BY_NAME: dict[str, type[errors.KvmemError]] = {cls.__name__: cls for cls in ERROR_CODES}
# the class a bare status code stands for (the base class where several share a code)
CODE_ERRORS: dict[grpc.StatusCode, type[errors.KvmemError]] = {}
for _cls, _code in ERROR_CODES.items():
    if _cls is not errors.ModelMismatch:
        CODE_ERRORS.setdefault(_code, _cls)


def error_class(exc: errors.KvmemError) -> type[errors.KvmemError] | None:
    """The most specific class of the table that ``exc`` is an instance of."""
    for cls in type(exc).__mro__:
        if cls in ERROR_CODES:
            return cls
    return None


def code_for(exc: errors.KvmemError) -> grpc.StatusCode:
    cls = error_class(exc)
    return ERROR_CODES[cls] if cls is not None else grpc.StatusCode.INTERNAL


class RemoteError(errors.KvmemError):
    """A server error without a more specific kvmem class (INTERNAL, DEADLINE_EXCEEDED, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def from_rpc_error(exc: grpc.RpcError) -> errors.KvmemError:
    """The kvmem exception for a failed call (keeps the server's message; ``.code`` is set)."""
    code, details = exc.code(), exc.details() or ""
    named = None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_METADATA_KEY:
            named = ERRORS_BY_NAME.get(value)
    cls = named if named is not None and ERROR_CODES[named] == code else CODE_ERRORS.get(code)
    error = cls(details) if cls is not None else RemoteError(code, details)
    error.code = code
    return error
