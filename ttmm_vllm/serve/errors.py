"""Every error a request can end in, and the one map from errors to status codes.

The service, the engine and the front doors raise these domain errors; each transport (gRPC,
Ray Serve's proxy, HTTP) turns them into its own status with `status_of`, so one error gets
the same code whatever door the request came through. A message is safe to show the client:
it names the field or the limit, never a stack trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ttmm_vllm.library import LibraryError


class ServiceError(Exception):
    """Base of the errors a client can cause or must be told about."""

    code = "FAILED_PRECONDITION"


class InvalidArgument(ServiceError):
    """A field of the request is wrong; the message starts with the field's name."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """An admin change that is already in place (e.g. AddExpert of a served expert)."""

    code = "ALREADY_EXISTS"


class ResourceExhausted(ServiceError):
    """Admission control said no: retry later."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """The server cannot serve now (shutting down, engine dead): retry elsewhere or later."""

    code = "UNAVAILABLE"


class Unimplemented(ServiceError):
    code = "UNIMPLEMENTED"


class EngineError(RuntimeError):
    """The engine cannot serve (dead, or shut down)."""


class RequestRejected(ValueError):
    """vLLM refused the request as given (its own validation): the caller's fault."""


class AdapterBuildError(RuntimeError):
    """Merging or registering an adapter failed; the request cannot be served with it."""


# gRPC status code name -> HTTP status, for the HTTP front door.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "INTERNAL": 500, "CANCELLED": 499,
    "DEADLINE_EXCEEDED": 504,
}


@dataclass(frozen=True)
class Status:
    """A transport-neutral status: the gRPC code's name, its HTTP twin and a safe message."""

    code: str
    message: str

    @property
    def http(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    @property
    def internal(self) -> bool:
        return self.code == "INTERNAL"


def status_of(e: BaseException) -> Status:
    """The status a request that raised `e` ends with (anything unknown is INTERNAL).

    Messages never carry an absolute filesystem path (`safe_message`)."""
    if isinstance(e, ServiceError):
        return Status(e.code, safe_message(str(e)))
    if isinstance(e, RequestRejected):
        return Status("INVALID_ARGUMENT", safe_message(str(e)))
    if isinstance(e, EngineError):
        return Status("UNAVAILABLE", safe_message(str(e)))
    if isinstance(e, LibraryError | AdapterBuildError):
        return Status("FAILED_PRECONDITION", safe_message(str(e)))
    return Status("INTERNAL", f"internal error ({type(e).__name__})")


# An absolute POSIX path of two or more parts, at the start or after a space, quote, '(' or
# '=' (a library names its files relative to itself; anything else is the server's business).
_ABSOLUTE_PATH = re.compile(r"(?:(?<=^)|(?<=[\s'\"(=:]))/[^\s'\"/)]+(?:/[^\s'\")]*)+")


def safe_message(message: str) -> str:
    """`message` with every absolute path replaced by its last part ("<path>/name")."""
    return _ABSOLUTE_PATH.sub(lambda m: "<path>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1],
                              message)
