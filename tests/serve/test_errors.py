"""errors.status_of: one status per error class, whatever the door; grpc_status in gRPC's terms."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttmm_vllm.library import LibraryError
from ttmm_vllm.serve.errors import (
    HTTP_STATUS,
    AdapterBuildError,
    AlreadyExists,
    EngineError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestRejected,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    safe_message,
    status_of,
)
from ttmm_vllm.serve.grpc_server import grpc_status

# (the error, the code it ends in, its HTTP twin)
CASES = [
    (ServiceError("the library changed"), "FAILED_PRECONDITION", 400),
    (InvalidArgument("sampling.top_p", "must be in (0, 1], got 2"), "INVALID_ARGUMENT", 400),
    (Unauthenticated("missing token"), "UNAUTHENTICATED", 401),
    (PermissionDenied("experts [2] are not permitted"), "PERMISSION_DENIED", 403),
    (NotFound("expert 9 is not served"), "NOT_FOUND", 404),
    (AlreadyExists("expert 4 is already served"), "ALREADY_EXISTS", 409),
    (ResourceExhausted("64 requests in flight"), "RESOURCE_EXHAUSTED", 429),
    (Unimplemented("live library changes are not enabled"), "UNIMPLEMENTED", 501),
    (Unavailable("shutting down"), "UNAVAILABLE", 503),
    (RequestRejected("vLLM refused the prompt"), "INVALID_ARGUMENT", 400),
    (EngineError("engine is dead"), "UNAVAILABLE", 503),
    (LibraryError("checksum mismatch for expert 3"), "FAILED_PRECONDITION", 400),
    (AdapterBuildError("building the merged adapter failed: disk full"),
     "FAILED_PRECONDITION", 400),
]


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


@pytest.mark.parametrize("error, code, http", CASES, ids=lambda x: type(x).__name__
                         if isinstance(x, BaseException) else None)
def test_every_error_class_has_its_code_and_http_status(error, code, http):
    st_ = status_of(error)
    assert (st_.code, st_.http) == (code, http)
    assert st_.message == str(error)  # a domain error's message is safe to show as it is
    assert not st_.internal
    gcode, message = grpc_status(error)
    assert gcode is getattr(grpc.StatusCode, code) and message == str(error)


def test_the_cases_cover_every_error_class_of_the_map():
    """A new ServiceError subclass in errors.py must be added to CASES (with its code)."""
    ours = {c for c in _subclasses(ServiceError) if c.__module__ == ServiceError.__module__}
    assert ours <= {type(e) for e, _, _ in CASES}


def test_every_service_error_class_anywhere_has_a_real_code():
    from ttmm_vllm.serve.http_server import ClientGone  # a door's own error

    classes = {c for c in _subclasses(ServiceError) if c.__module__.startswith("ttmm_vllm.")}
    assert {ClientGone, InvalidArgument, AlreadyExists} <= classes
    for cls in classes:
        assert cls.code in HTTP_STATUS, f"{cls.__name__}.code {cls.code!r} has no HTTP status"
        assert grpc.StatusCode[cls.code].name == cls.code


def test_a_code_without_an_http_twin_is_500():
    error = type("Odd", (ServiceError,), {"code": "DATA_LOSS"})("lost")
    assert status_of(error).http == 500 and grpc_status(error)[0] is grpc.StatusCode.DATA_LOSS


def test_invalid_argument_names_its_field_first():
    e = InvalidArgument("routing.beta", "must be a finite number > 0, got 0.0")
    assert e.field == "routing.beta"
    assert str(e) == "routing.beta: must be a finite number > 0, got 0.0"


@pytest.mark.parametrize("error", [
    ValueError("/home/secret/path not found"),
    KeyError("api-key-123"),
    RuntimeError("CUDA error: an illegal memory access at 0xdeadbeef"),
    ZeroDivisionError("division by zero"),
    AssertionError("slot table corrupt"),
])
def test_unknown_errors_are_internal_and_do_not_leak_their_message(error):
    st_ = status_of(error)
    assert st_.code == "INTERNAL" and st_.http == 500 and st_.internal
    assert st_.message == f"internal error ({type(error).__name__})"
    assert grpc_status(error) == (grpc.StatusCode.INTERNAL, st_.message)


@given(st.text(min_size=1), st.sampled_from([ValueError, RuntimeError, OSError, TypeError,
                                            IndexError, MemoryError]))
def test_no_unknown_error_message_reaches_the_client(text, cls):
    message = status_of(cls(text)).message
    assert message == f"internal error ({cls.__name__})"


@pytest.mark.parametrize("name", sorted(HTTP_STATUS))
def test_grpc_status_maps_every_code_name_to_a_real_status_code(name):
    error = type("Some" + name.title().replace("_", ""), (ServiceError,), {"code": name})("m")
    code, message = grpc_status(error)
    assert isinstance(code, grpc.StatusCode) and code.name == name and message == "m"
    assert status_of(error).http == HTTP_STATUS[name]


def test_http_statuses_are_the_usual_ones():
    assert HTTP_STATUS["INTERNAL"] == 500 and HTTP_STATUS["DEADLINE_EXCEEDED"] == 504
    assert {grpc.StatusCode[n] for n in HTTP_STATUS} >= {grpc.StatusCode.CANCELLED,
                                                          grpc.StatusCode.UNAVAILABLE}


@pytest.mark.parametrize("error", [
    LibraryError("checksum mismatch for /srv/ttmm/lib/experts/0003/adapter.safetensors"),
    AdapterBuildError("building the merged adapter failed: [Errno 28] No space left on device:"
                      " '/var/tmp/ttmm-scratch/lora-17/adapter.safetensors'"),
    EngineError("engine died (log at /home/ttmm/.cache/vllm/adapter.safetensors)"),
    InvalidArgument("expert_id", "no file at path=/opt/lib/experts/0004/adapter.safetensors"),
])
def test_domain_messages_lose_absolute_paths(error):
    message = status_of(error).message
    assert "<path>/adapter.safetensors" in message
    assert "/srv" not in message and "/var" not in message and "/home" not in message
    assert "/opt" not in message and "experts/0003" not in message
    assert grpc_status(error)[1] == message


segment = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)


@given(st.lists(segment, min_size=2, max_size=6), st.sampled_from(["", "'", '"', "("]))
def test_safe_message_keeps_only_the_last_part_of_a_path(parts, quote):
    closing = {"(": ")"}.get(quote, quote)
    message = f"cannot read {quote}/{'/'.join(parts)}{closing}: denied"
    assert safe_message(message) == f"cannot read {quote}<path>/{parts[-1]}{closing}: denied"


@pytest.mark.parametrize("message", [
    "experts/0003/adapter.safetensors: checksum mismatch",  # relative to the library
    "weights must sum to 1/2 or more",
    "top_p must be in (0, 1], got 2",
    "/single",
])
def test_safe_message_leaves_other_text_alone(message):
    assert safe_message(message) == message
