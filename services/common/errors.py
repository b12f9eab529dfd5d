"""Errors engines raise, and the one mapping from them to gRPC status codes and HTTP statuses.

Engines raise these plain exceptions with exact messages; servers translate them at the boundary with
`grpc_code` / `http_status`. Anything else becomes INTERNAL carrying the request id and no traceback.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class MeshError(Exception):
    """Base class: an error the client should see, with a message fit to show it."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MeshError):
    """A request field is malformed. The message starts with the field's name."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(MeshError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Unauthenticated(MeshError):
    """No API key, or one the gateway does not know. Checked before any work: the stages never see the request."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class ResourceExhausted(MeshError):
    """Over a limit for now: the client should come back after `retry_after_s` (REST `Retry-After`, gRPC
    `google.rpc.RetryInfo`)."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(MeshError):
    """A stage cannot be reached or is not serving. The message names the stage."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage} stage unavailable: {reason}")
        self.stage = stage


class DeadlineExceeded(MeshError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Cancelled(MeshError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499  # nginx's "client closed request": the nearest HTTP has


class Internal(MeshError):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


# A device allocation that failed: the request did not fit in the device memory free at that moment. Another time
# (fewer requests at once), or a smaller request, may fit: RESOURCE_EXHAUSTED with a retry hint, not INTERNAL.
OUT_OF_MEMORY_RETRY_S = 5.0


def device_out_of_memory(error: BaseException, service: str) -> ResourceExhausted | None:
    """`error` as the client sees it if it is PyTorch's OutOfMemoryError (CUDA's, XPU's), else None. Matched by name:
    the gateway shares this module and never imports torch."""
    if type(error).__name__ != "OutOfMemoryError" or type(error).__module__.split(".")[0] != "torch":
        return None
    return ResourceExhausted(f"{service}: out of device memory for this request; retry later, or ask for a smaller "
                             "size, fewer frames or fewer outputs", retry_after_s=OUT_OF_MEMORY_RETRY_S)


# gRPC codes a downstream stage may return, and the error the gateway re-raises for each. Codes that
# mean "that stage is broken or gone" become Unavailable naming the stage.
_FROM_GRPC: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}

HTTP_STATUS_BY_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}


def from_rpc_error(stage: str, error: grpc.RpcError) -> MeshError:
    """Translate a failed call to `stage` into the error the gateway reports to its client."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or code.name.lower()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, reason = details.partition(": ")
        return InvalidArgument(field, reason) if reason else InvalidArgument(stage, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after_s = _retry_after_s(error)
        if retry_after_s is not None:
            return ResourceExhausted(f"{stage}: {details}", retry_after_s=retry_after_s)
    if code in _FROM_GRPC:
        return _FROM_GRPC[code](f"{stage}: {details}")
    return Unavailable(stage, details)


def _retry_after_s(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay a stage sent with its error (server.status_of packs it), so the gateway waits
    as long as the stage asked (5 s after a device ran out of memory) and not its own default."""
    if not hasattr(error, "trailing_metadata"):
        return None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None
