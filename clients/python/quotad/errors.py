"""The exceptions the client raises, and the one place gRPC errors are translated.

    QuotadError                 any error status from quotad (or from the way to it)
    +-- InvalidArgument         INVALID_ARGUMENT, with the server's field violations
    +-- NotFound                NOT_FOUND: unknown or expired reservation
    +-- FailedPrecondition      FAILED_PRECONDITION: e.g. Commit after Release
    +-- Unavailable             UNAVAILABLE or DEADLINE_EXCEEDED: quotad or its Redis did not
                                answer in time; choose to fail open or closed
    QuotaDenied                 not a gRPC error: `reserve()` was denied (a denial is an answer;
                                only the context manager, which cannot proceed, raises it)

Every QuotadError keeps the gRPC status code in `code` and the original grpc error as
`__cause__`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from quotad.v1 import quota_pb2 as pb

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, as the server named it (google.rpc.BadRequest)."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class QuotadError(Exception):
    """An error status from quotad; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")


class InvalidArgument(QuotadError):
    """The server refused the request; `field_violations` says which fields and why."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: tuple[FieldViolation, ...]) -> None:
        super().__init__(code, message)
        self.field_violations = violations


class NotFound(QuotadError):
    """The reservation is unknown or past its retention."""


class FailedPrecondition(QuotadError):
    """The request is valid but the reservation's state forbids it (e.g. Commit after Release)."""


class Unavailable(QuotadError):
    """quotad, or the Redis behind it, did not answer in time; nothing is known to have changed."""


class QuotaDenied(Exception):
    """`reserve()` was denied and could not wait (long enough) for the quota to free up.

    `retry_after` is when this same request fits, or None when it never can
    (`reason == pb.DENY_REASON_EXCEEDS_CAPACITY`); `binding_limit` names the limit
    that decided; `response` is the full answer.
    """

    def __init__(self, response: pb.CheckAndReserveResponse) -> None:
        self.response = response
        self.reason = response.deny_reason
        self.binding_limit = response.binding_limit
        self.retry_after: timedelta | None = (
            response.retry_after.ToTimedelta() if response.HasField("retry_after") else None
        )
        reason = pb.DenyReason.Name(response.deny_reason)
        when = (
            "never fits" if self.retry_after is None else f"retry after {self.retry_after.total_seconds()}s"
        )
        super().__init__(f"quota denied by {self.binding_limit!r} ({reason}): {when}")


_ERRORS: dict[grpc.StatusCode, type[QuotadError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def from_rpc_error(error: grpc.RpcError) -> QuotadError:
    """The QuotadError for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    if isinstance(error, grpc.aio.AioRpcError):
        code, message, trailers = error.code(), error.details() or "", error.trailing_metadata()
    else:
        call: grpc.Call = error  # type: ignore[assignment]  # sync errors are also the Call
        code, message, trailers = call.code(), call.details() or "", call.trailing_metadata()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(code, message, field_violations(trailers))
    return _ERRORS.get(code, QuotadError)(code, message)


def field_violations(trailers: object) -> tuple[FieldViolation, ...]:
    """The google.rpc.BadRequest field violations in a call's trailing metadata."""
    for key, value in trailers or ():  # type: ignore[attr-defined]
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return _decode_violations(value)
    return ()


# google.rpc.Status and google.rpc.BadRequest, declared in a private descriptor pool so the
# client needs only `protobuf` (not googleapis-common-protos) and never clashes with a
# process that also loads the real ones.
@functools.cache
def _rpc_messages() -> tuple[type[Message], type[Message]]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(any_pb2.DESCRIPTOR.serialized_pb))
    field = descriptor_pb2.FieldDescriptorProto
    status = descriptor_pb2.DescriptorProto(
        name="Status",
        field=[
            field(name="code", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL),
            field(name="message", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL),
            field(
                name="details",
                number=3,
                type=field.TYPE_MESSAGE,
                type_name=".google.protobuf.Any",
                label=field.LABEL_REPEATED,
            ),
        ],
    )
    violation = descriptor_pb2.DescriptorProto(
        name="FieldViolation",
        field=[
            field(name="field", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL),
            field(name="description", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL),
        ],
    )
    bad_request = descriptor_pb2.DescriptorProto(
        name="BadRequest",
        nested_type=[violation],
        field=[
            field(
                name="field_violations",
                number=1,
                type=field.TYPE_MESSAGE,
                type_name=".google.rpc.BadRequest.FieldViolation",
                label=field.LABEL_REPEATED,
            )
        ],
    )
    pool.Add(
        descriptor_pb2.FileDescriptorProto(
            name="quotad/_private/google_rpc.proto",
            package="google.rpc",
            syntax="proto3",
            dependency=["google/protobuf/any.proto"],
            message_type=[status, bad_request],
        )
    )
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.BadRequest")),
    )


def _decode_violations(status_bytes: bytes) -> tuple[FieldViolation, ...]:
    status_class, bad_request_class = _rpc_messages()
    try:
        status: object = status_class.FromString(status_bytes)
        found: list[FieldViolation] = []
        for detail in status.details:  # type: ignore[attr-defined]
            if detail.type_url == _BAD_REQUEST_TYPE:
                bad_request: object = bad_request_class.FromString(detail.value)
                found += [
                    FieldViolation(v.field, v.description)
                    for v in bad_request.field_violations  # type: ignore[attr-defined]
                ]
        return tuple(found)
    except DecodeError:
        return ()
