"""The one exception tree of tfs-router, and the one table from error to status.

Every failure that reaches a client is a ``ServingError``: the frontends turn it
into a gRPC status or an HTTP status with a ``{"error": "..."}`` body, using
TF Serving's own mapping (``tensorflow_serving/model_servers/http_rest_api_util``
maps ``INVALID_ARGUMENT`` and ``FAILED_PRECONDITION`` to 400, ``NOT_FOUND`` to
404, ``RESOURCE_EXHAUSTED`` to 429, ``UNAVAILABLE`` to 503,
``DEADLINE_EXCEEDED`` to 504 and so on).  Library errors are wrapped at the
boundary where they happen, chained with ``from exc``.

    ServingError
    +-- InvalidArgument        INVALID_ARGUMENT     400
    +-- FailedPrecondition     FAILED_PRECONDITION  400
    +-- NotFound               NOT_FOUND            404
    +-- ResourceExhausted      RESOURCE_EXHAUSTED   429 (+ Retry-After)
    +-- Unavailable            UNAVAILABLE          503
    +-- DeadlineExceeded       DEADLINE_EXCEEDED    504
    +-- Cancelled              CANCELLED            499
    +-- Unimplemented          UNIMPLEMENTED        501
    +-- Internal               INTERNAL             500

This module must stay free of TensorFlow and of any I/O.
"""

from __future__ import annotations

import grpc

# gRPC status -> HTTP status, as TF Serving's REST layer maps them.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# grpc.StatusCode -> the numeric code carried in tensorflow.error.Code /
# StatusProto.error_code (the canonical codes share their numbers).
CODE_NUMBER: dict[grpc.StatusCode, int] = {c: c.value[0] for c in grpc.StatusCode}
CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {n: c for c, n in CODE_NUMBER.items()}


class ServingError(Exception):
    """Base of every error that is reported to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers that go with this error."""
        return {}


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServingError):
    """Overload, refused early; ``retry_after`` seconds is a hint to the client."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(ServingError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ServingError):
    code = grpc.StatusCode.INTERNAL


class BindError(Exception):
    """A frontend could not listen on its address (start-up, not a request error)."""


_BY_CODE: dict[grpc.StatusCode, type[ServingError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        FailedPrecondition,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
}


def from_code(code: grpc.StatusCode, message: str) -> ServingError:
    """The error for a status received from another process (a worker)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = ServingError(message)
        err.code = code
        return err
    return cls(message)
