"""The one table between kvmem's error hierarchy and gRPC status codes (server and client)."""
from __future__ import annotations

import grpc

from kvstore import errors

ERROR_CODES: dict[type[errors.KvmemError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.CorruptData: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
CODE_ERRORS: dict[grpc.StatusCode, type[errors.KvmemError]] = {code: cls for cls, code in ERROR_CODES.items()}


def code_for(exc: errors.KvmemError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]
    return grpc.StatusCode.INTERNAL


class RemoteError(errors.KvmemError):
    """A server error without a more specific kvmem class (INTERNAL, DEADLINE_EXCEEDED, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def from_rpc_error(exc: grpc.RpcError) -> errors.KvmemError:
    """The kvmem exception for a failed call (keeps the server's message; ``.code`` is set)."""
    code, details = exc.code(), exc.details() or ""
    cls = CODE_ERRORS.get(code)
    error = cls(details) if cls is not None else RemoteError(code, details)
    error.code = code
    return error
