"""The gRPC servicer: proto <-> model, errors -> status codes, one log line per RPC.

Nothing is decided here; QuotaCore decides. The edge also owns what only the wire can get
wrong: bodies that do not decode, Durations out of their own range, unknown enum values,
and the size of the errors sent back.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc

from quotad_server.auth import ANONYMOUS, Authenticator, Caller
from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidRequest,
    NotFound,
    NotReady,
    PermissionDenied,
    QuotadError,
    StoreUnavailable,
    Unauthenticated,
)
from quotad_server.logs import rpc_logger
from quotad_server.model import (
    Algorithm,
    Cost,
    Decision,
    DenyReason,
    Limit,
    LimitStatus,
    Metric,
    OutputSource,
    Priority,
    ReserveOutcome,
    Scope,
    ServiceTier,
    SettleOutcome,
)
from quotad_server.tokens import ChatMessage, ImagePart, ToolCall, ToolDefinition

Response = TypeVar("Response")
Item = TypeVar("Item")
Result = TypeVar("Result")
Request = TypeVar("Request", bound=Message)
MAX_BATCH = 1000
STREAM_WINDOW = 256  # items of one stream decided concurrently before reading more

# Errors are bounded whatever the request: a status travels in trailing metadata, which
# clients cap (gRPC's default: 8 KB, then rejections at random up to a hard 16 KB), and a
# client over the cap sees RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT it earned.
# Worst case here: a 1 KB message (3 KB once percent-encoded) and ~2.3 KB of BadRequest
# (3.1 KB in base64). Batch and stream item errors get the same bounds: a 1000-item batch of
# errors stays within the 4 MB a client receives by default.
# google.rpc.ErrorInfo's domain (AIP-193): the project's, as the reverse of its Maven group
# io.github.quotad-dev. With the reasons in errors.py it names each error for good.
ERROR_DOMAIN = "quotad-dev.github.io"
MAX_VIOLATIONS = 20  # field violations sent; one more says how many were left out
MAX_VIOLATION_BYTES = 2048  # their fields and descriptions together, in UTF-8
MAX_FIELD_BYTES = 128
MAX_DESCRIPTION_BYTES = 512
MAX_MESSAGE_BYTES = 1024
LOG_FIELD_BYTES = 256  # request strings in the log line (the core refuses longer ids anyway)
DURATION_MAX_SECONDS = 315_576_000_000  # google.protobuf.Duration's range: +-10,000 years
_NANOS_MAX = 999_999_999

_DECISION = {Decision.ALLOWED: pb.DECISION_ALLOWED, Decision.DENIED: pb.DECISION_DENIED}
_DENY_REASON = {
    DenyReason.LIMIT_EXCEEDED: pb.DENY_REASON_LIMIT_EXCEEDED,
    DenyReason.EXCEEDS_CAPACITY: pb.DENY_REASON_EXCEEDS_CAPACITY,
    DenyReason.BUDGET_EXHAUSTED: pb.DENY_REASON_BUDGET_EXHAUSTED,
    DenyReason.QUEUE_FULL: pb.DENY_REASON_QUEUE_FULL,
}
_PRIORITY = {
    Priority.LOW: pb.PRIORITY_LOW,
    Priority.NORMAL: pb.PRIORITY_NORMAL,
    Priority.HIGH: pb.PRIORITY_HIGH,
}
_PRIORITY_IN = {value: key for key, value in _PRIORITY.items()}
_SERVICE_TIER_IN = {
    pb.SERVICE_TIER_UNSPECIFIED: ServiceTier.STANDARD,
    pb.SERVICE_TIER_STANDARD: ServiceTier.STANDARD,
    pb.SERVICE_TIER_BATCH: ServiceTier.BATCH,
    pb.SERVICE_TIER_FLEX: ServiceTier.FLEX,
    pb.SERVICE_TIER_PRIORITY: ServiceTier.PRIORITY,
}
_OUTPUT_SOURCE = {
    OutputSource.REQUESTED: pb.OUTPUT_RESERVATION_REQUESTED,
    OutputSource.LEARNED: pb.OUTPUT_RESERVATION_LEARNED,
    OutputSource.MODEL_MAXIMUM: pb.OUTPUT_RESERVATION_MODEL_MAXIMUM,
}
_DETAIL_IN = {pb.IMAGE_DETAIL_UNSPECIFIED: "auto", pb.IMAGE_DETAIL_LOW: "low", pb.IMAGE_DETAIL_HIGH: "high"}
_SCOPE = {Scope.SUBJECT: pb.SCOPE_SUBJECT, Scope.TENANT: pb.SCOPE_TENANT, Scope.GLOBAL: pb.SCOPE_GLOBAL}
_METRIC = {
    Metric.REQUESTS: pb.METRIC_REQUESTS,
    Metric.INPUT_TOKENS: pb.METRIC_INPUT_TOKENS,
    Metric.OUTPUT_TOKENS: pb.METRIC_OUTPUT_TOKENS,
    Metric.TOTAL_TOKENS: pb.METRIC_TOTAL_TOKENS,
    Metric.CONCURRENT: pb.METRIC_CONCURRENT,
    Metric.COST_USD: pb.METRIC_COST_USD,
}
_ALGORITHM = {
    Algorithm.TOKEN_BUCKET: pb.ALGORITHM_TOKEN_BUCKET,
    Algorithm.SLIDING_WINDOW: pb.ALGORITHM_SLIDING_WINDOW,
    Algorithm.CONCURRENCY: pb.ALGORITHM_CONCURRENCY,
    Algorithm.CALENDAR: pb.ALGORITHM_CALENDAR,
}


# Responses are filled in place: setting the fields of a message's own sub-message costs
# half of building a new one and copying it in (CopyFrom), on the path of every decision.


def _put_us(into: duration_pb2.Duration | timestamp_pb2.Timestamp, us: int) -> None:
    """Write microseconds into a Duration or Timestamp field."""
    into.seconds, micros = divmod(us, 1_000_000)
    into.nanos = micros * 1000


def _put_cost(into: pb.Cost, cost: Cost) -> None:
    into.requests = cost.requests
    into.input_tokens = cost.input_tokens
    into.output_tokens = cost.output_tokens
    into.cached_input_tokens = cost.cached_input_tokens
    into.cost_micro_usd = cost.cost_micro_usd
    into.cache_write_input_tokens = cost.cache_write_input_tokens


def _cost(cost: Cost) -> pb.Cost:
    message = pb.Cost()
    _put_cost(message, cost)
    return message


@functools.lru_cache(maxsize=4096)
def _limit_template(limit: Limit) -> pb.LimitStatus:
    """The parts of a LimitStatus that come from the policy, built once per limit."""
    message = pb.LimitStatus(
        name=limit.name,
        scope=_SCOPE[limit.scope],
        metric=_METRIC[limit.metric],
        algorithm=_ALGORITHM[limit.algorithm],
        limit=limit.limit,
    )
    if limit.period_us:
        _put_us(message.period, limit.period_us)
    if limit.calendar:
        message.calendar = limit.calendar.value
    if limit.shadow:
        message.shadow = True
    return message


def _add_limit_statuses(
    into: RepeatedCompositeFieldContainer[pb.LimitStatus], statuses: Sequence[LimitStatus]
) -> None:
    for status in statuses:
        message = into.add()
        message.CopyFrom(_limit_template(status.limit))
        message.remaining = status.remaining
        _put_us(message.reset_after, status.reset_after_us)
        if status.denied:
            message.denied = True
        if status.binding:
            message.binding = True


def _code_of(error: QuotadError) -> int:
    """The gRPC status code number for an error."""
    if isinstance(error, InvalidRequest):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(error, NotFound):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(error, FailedPrecondition):
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif isinstance(error, StoreUnavailable | NotReady):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(error, DeadlineExceeded):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(error, Unauthenticated):
        code = grpc.StatusCode.UNAUTHENTICATED
    elif isinstance(error, PermissionDenied):
        code = grpc.StatusCode.PERMISSION_DENIED
    else:
        code = grpc.StatusCode.INTERNAL
    number: int = code.value[0]
    return number


def _clip(text: str, limit: int) -> str:
    """`text` if it fits in `limit` UTF-8 bytes, else its longest prefix that does with an ellipsis."""
    if len(text) * 4 <= limit:  # no character takes more than 4 bytes: the usual case, no encoding
        return text
    encoded = text.encode(errors="replace")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "\u2026"  # the ellipsis takes 3 bytes


def _message(error: QuotadError) -> str:
    """The error's message for the caller, bounded."""
    return _clip(str(error), MAX_MESSAGE_BYTES)


def _violations(error: QuotadError) -> list[FieldViolation]:
    """The field violations to send for `error`: the first ones that fit the bounds, each
    clipped, then one (with no field) saying how many were left out."""
    if not isinstance(error, InvalidRequest):
        return []
    kept: list[FieldViolation] = []
    budget = MAX_VIOLATION_BYTES
    for violation in error.violations[:MAX_VIOLATIONS]:
        field = _clip(violation.field, MAX_FIELD_BYTES)
        description = _clip(violation.description, MAX_DESCRIPTION_BYTES)
        size = len(field.encode(errors="replace")) + len(description.encode(errors="replace"))
        if size > budget:
            break
        budget -= size
        kept.append(FieldViolation(field, description))
    left_out = len(error.violations) - len(kept)
    if left_out:
        kept.append(FieldViolation("", f"{left_out} more field violation{'s' * (left_out > 1)} left out"))
    return kept


def _packed(detail: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _status_for(error: QuotadError) -> grpc.Status:
    """The status a unary call fails with, its details as AIP-193 has them: a google.rpc.ErrorInfo
    with the error's stable reason, a google.rpc.RetryInfo when a retry after a delay may succeed
    (UNAVAILABLE), and field violations as a google.rpc.BadRequest."""
    details = [_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))]
    if error.retry_delay_ms is not None:
        retry_info = error_details_pb2.RetryInfo()
        _put_us(retry_info.retry_delay, error.retry_delay_ms * 1000)
        details.append(_packed(retry_info))
    violations = _violations(error)
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in violations
            ]
        )
        details.append(_packed(bad_request))
    status_proto = status_pb2.Status(code=_code_of(error), message=_message(error), details=details)
    status: grpc.Status = rpc_status.to_status(status_proto)
    return status


def _item_error(error: QuotadError) -> pb.Error:
    """The error result of one batch or stream item, bounded as a unary call's status is."""
    return pb.Error(
        code=_code_of(error),
        message=_message(error),
        field_violations=[
            pb.FieldViolation(field=v.field, description=v.description) for v in _violations(error)
        ],
    )


def _commit_args(request: pb.CommitRequest) -> tuple[str, int, int, int, int]:
    """The usage a Commit reports: reservation id, input, output, cached and cache-write input tokens."""
    return (
        request.reservation_id,
        request.input_tokens,
        request.output_tokens,
        request.cached_input_tokens,
        request.cache_write_input_tokens,
    )


def _put_reserve_result(
    into: pb.CheckAndReserveResult, outcome: ReserveOutcome | QuotadError, tally: dict[str, Any]
) -> None:
    """One batch or stream item's answer, counted in `tally` (allowed, denied, errors)."""
    if isinstance(outcome, QuotadError):
        tally["errors"] += 1
        into.error.CopyFrom(_item_error(outcome))
        return
    tally["allowed" if outcome.decision is Decision.ALLOWED else "denied"] += 1
    _fill_reserve_response(into.response, outcome, {})


def _put_commit_result(
    into: pb.CommitResult, outcome: SettleOutcome | QuotadError, tally: dict[str, Any]
) -> None:
    """One batch or stream item's answer, counted in `tally` (committed, errors)."""
    if isinstance(outcome, QuotadError):
        tally["errors"] += 1
        into.error.CopyFrom(_item_error(outcome))
        return
    tally["committed"] += 1
    into.response.CopyFrom(_commit_response(outcome))


def _micros(duration: duration_pb2.Duration, field: str, violations: list[FieldViolation]) -> int:
    """A Duration in microseconds; a violation naming `field` if it is not a valid Duration."""
    seconds, nanos = duration.seconds, duration.nanos
    if not -DURATION_MAX_SECONDS <= seconds <= DURATION_MAX_SECONDS:
        problem = f"seconds must be between -{DURATION_MAX_SECONDS} and {DURATION_MAX_SECONDS}, got {seconds}"
    elif not -_NANOS_MAX <= nanos <= _NANOS_MAX:
        problem = f"nanos must be between -{_NANOS_MAX} and {_NANOS_MAX}, got {nanos}"
    elif (seconds < 0 < nanos) or (nanos < 0 < seconds):
        problem = f"seconds ({seconds}) and nanos ({nanos}) must have the same sign"
    else:
        return seconds * 1_000_000 + nanos // 1000
    violations.append(FieldViolation(field, f"not a valid google.protobuf.Duration: {problem}"))
    return 0


def _message_in(message: pb.ChatMessage) -> ChatMessage:
    if not message.tool_calls and not message.images and not message.tool_call_id:
        return ChatMessage(message.role, message.content, message.name)
    return ChatMessage(
        message.role,
        message.content,
        message.name,
        tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls),
        tool_call_id=message.tool_call_id,
        images=tuple(ImagePart(i.width, i.height, _DETAIL_IN.get(i.detail, "auto")) for i in message.images),
    )


def _reserve_request(
    request: pb.CheckAndReserveRequest,
    max_messages: int,
    time_left_s: float | None = None,
    caller: Caller = ANONYMOUS,
) -> ReserveRequest:
    """The core's request. Raises InvalidRequest for what only the wire form can get wrong
    (Durations, enum values), before the core checks the rest. `time_left_s`: until the
    caller's gRPC deadline, if it set one."""
    violations: list[FieldViolation] = []
    lease_us = _micros(request.lease, "lease", violations) if request.HasField("lease") else None
    max_wait_us = _micros(request.max_wait, "max_wait", violations) if request.HasField("max_wait") else 0
    priority = None
    if request.priority != pb.PRIORITY_UNSPECIFIED:
        priority = _PRIORITY_IN.get(request.priority)
        if priority is None:
            violations.append(
                FieldViolation(
                    "priority", f"unknown priority {request.priority}; use PRIORITY_LOW, _NORMAL or _HIGH"
                )
            )
    service_tier = _SERVICE_TIER_IN.get(request.service_tier)
    if service_tier is None:
        violations.append(
            FieldViolation(
                "service_tier",
                f"unknown service tier {request.service_tier}; use SERVICE_TIER_STANDARD, _BATCH, _FLEX or _PRIORITY",
            )
        )
    if violations:
        raise InvalidRequest(violations)
    return ReserveRequest(
        subject=request.subject,
        tenant=request.tenant,
        tier=request.tier,
        model=request.model,
        input_tokens=request.input_tokens,
        max_output_tokens=request.max_output_tokens,
        lease_us=lease_us,
        idempotency_key=request.idempotency_key,
        prompt=request.prompt,
        # One past the core's bound at most: the core refuses more, and a 4 MB body of empty
        # messages (two million) would cost seconds to turn into model objects.
        messages=tuple(_message_in(m) for m in request.messages[: max_messages + 1])
        if request.messages
        else (),
        tools=tuple(
            ToolDefinition(t.name, t.description, t.parameters_json)
            for t in request.tools[: max_messages + 1]
        ),
        service_tier=service_tier or ServiceTier.STANDARD,
        priority=priority,
        max_wait_us=max_wait_us,
        time_left_s=time_left_s,
        caller=caller,
    )


def _reserve_requests(
    requests: Sequence[pb.CheckAndReserveRequest],
    max_messages: int,
    time_left_s: float | None,
    caller: Caller,
) -> list[ReserveRequest | InvalidRequest]:
    """A batch's requests, each translated on its own: a bad one is that item's error."""
    translated: list[ReserveRequest | InvalidRequest] = []
    for request in requests:
        try:
            translated.append(_reserve_request(request, max_messages, time_left_s, caller))
        except InvalidRequest as error:
            translated.append(error)
    return translated


def shadow_denials(outcome: ReserveOutcome) -> list[str]:
    """The shadow limits that would have denied an admitted request, for its log line."""
    if outcome.decision is not Decision.ALLOWED:
        return []
    return [status.limit.name for status in outcome.limits if status.shadow_denied]


def _fill_reserve_response(
    response: pb.CheckAndReserveResponse, outcome: ReserveOutcome, fields: dict[str, Any]
) -> None:
    """Write a decision into `response`, and what the log line should say into `fields`."""
    response.decision = _DECISION[outcome.decision]
    response.tenant = outcome.tenant
    response.tier = outcome.tier
    response.replayed = outcome.replayed
    response.priority = _PRIORITY[outcome.priority]
    if outcome.waited_us:
        _put_us(response.waited, outcome.waited_us)
    _add_limit_statuses(response.limits, outcome.limits)
    fields.update(tenant=outcome.tenant, tier=outcome.tier, decision=outcome.decision.value)
    shadow_denied = shadow_denials(outcome)
    if shadow_denied:
        fields["shadow_denied"] = shadow_denied
    if outcome.decision is Decision.ALLOWED:
        assert outcome.reserved is not None
        response.counted_input_tokens = outcome.counted_input_tokens
        response.output_reservation = _OUTPUT_SOURCE[outcome.output_source]
        response.reservation_id = outcome.reservation_id
        _put_us(response.lease_expires_at, outcome.lease_expires_at_us)
        _put_cost(response.reserved, outcome.reserved)
        fields["reservation_id"] = outcome.reservation_id
    else:
        assert outcome.deny_reason is not None
        response.deny_reason = _DENY_REASON[outcome.deny_reason]
        response.binding_limit = outcome.binding_limit or ""
        if outcome.retry_after_us is not None:
            _put_us(response.retry_after, outcome.retry_after_us)
        fields.update(binding_limit=outcome.binding_limit, retry_after_us=outcome.retry_after_us)


def _commit_response(outcome: SettleOutcome) -> pb.CommitResponse:
    return pb.CommitResponse(
        reserved=_cost(outcome.reserved),
        committed=_cost(outcome.committed),
        repeat=outcome.repeat,
        lease_expired=outcome.lease_expired,
        impossible_usage=outcome.impossible_usage,
        max_output_tokens=outcome.max_output_tokens or 0,
    )


async def _in_order(
    items: AsyncIterator[Item], decide: Callable[[Item], Awaitable[Result]]
) -> AsyncIterator[tuple[Item, Result]]:
    """Decide stream items concurrently (up to STREAM_WINDOW at once) and yield them in arrival order."""
    pending: asyncio.Queue[tuple[Item, asyncio.Future[Result]] | None] = asyncio.Queue(STREAM_WINDOW)

    async def feed() -> None:
        try:
            async for item in items:
                await pending.put((item, asyncio.ensure_future(decide(item))))
        finally:
            await pending.put(None)

    feeder = asyncio.create_task(feed())
    try:
        while (entry := await pending.get()) is not None:
            yield entry[0], await entry[1]
        await feeder  # surfaces a failure to read the stream
    finally:
        feeder.cancel()
        while not pending.empty():
            entry = pending.get_nowait()
            if entry is not None:
                entry[1].cancel()


# -- bodies that do not decode ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request deserializer returns, instead of raising, for bytes that are not a valid
    message of its type: a corrupt or truncated wire format, invalid UTF-8 in a string field.

    grpc answers UNKNOWN when a deserializer raises (and fails a stream with it); this lets
    the method answer INVALID_ARGUMENT instead, for the call or for that stream item.
    """

    type_name: str
    reason: str

    def error(self) -> InvalidRequest:
        """The error to answer with: no field can be named, so no field violations."""
        return InvalidRequest([], f"the request does not decode as {self.type_name}: {self.reason}")


def _decoded(request: Request | Undecodable) -> Request:
    """The request, or InvalidRequest if its body did not decode."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


def _decoder(message_class: type[Request]) -> Callable[[bytes], Request | Undecodable]:
    """A request deserializer that never raises."""
    parse, type_name = message_class.FromString, message_class.DESCRIPTOR.full_name

    def decode(body: bytes) -> Request | Undecodable:
        try:
            return parse(body)
        except DecodeError as error:  # upb's only failure on bytes, nesting too deep included
            # upb says "Error parsing message with type 'T': why"; the message names T already.
            reason = str(error).removeprefix(f"Error parsing message with type '{type_name}'")
            return Undecodable(type_name, reason.lstrip(": ") or "invalid wire format")

    return decode


def _refusing_undecodable(behaviour: Callable[..., Any], client_streaming: bool) -> Callable[..., Any]:
    """`behaviour` (a method of a servicer that knows nothing of Undecodable: grpc's health and
    reflection servicers) behind a check that answers INVALID_ARGUMENT for an undecodable
    request or stream item. It keeps the method's kind, which tells grpc.aio how to run it:
    a coroutine (health's Check and Watch), a blocking function (health's List, unimplemented
    in grpc.aio: run in grpc's thread pool), or an async generator over a request stream
    (reflection). Other kinds are not needed, so not guarded: TypeError, at start."""
    if client_streaming:
        if not inspect.isasyncgenfunction(behaviour):
            raise TypeError(f"{behaviour!r}: only async generators are guarded on request streams")

        async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(request.error()))
                yield request

        async def streaming(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for response in behaviour(checked(requests, context), context):
                yield response

        return streaming
    if inspect.iscoroutinefunction(behaviour):

        async def unary(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(request.error()))
            return await behaviour(request, context)

        return unary
    if inspect.isasyncgenfunction(behaviour):
        raise TypeError(f"{behaviour!r}: async generators are guarded on request streams only")

    def blocking(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(request.error()))
        return behaviour(request, context)

    return blocking


_HANDLER_KINDS = {  # (client streaming, server streaming) -> grpc's handler factory
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def rpc_method_handlers(
    service: ServiceDescriptor, servicer: object, *, refuse_undecodable: bool = False
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """A handler for every method of `service`, served by the servicer's method of that name,
    as the generated add_*_to_server would register, except that the request deserializers
    never raise: an undecodable body reaches the method as an `Undecodable`.

    QuotaServicer answers it itself (logged and counted like any bad input; a stream item gets
    an error result). For servicers that expect only messages (grpc's health and reflection),
    `refuse_undecodable` answers INVALID_ARGUMENT before the servicer sees it.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name)
        if refuse_undecodable:
            behaviour = _refusing_undecodable(behaviour, method.client_streaming)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            behaviour,
            request_deserializer=_decoder(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
    return handlers


def add_service(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: object, *, refuse_undecodable: bool = False
) -> None:
    """Serve `service` with `servicer` on `server` (see rpc_method_handlers)."""
    handlers = rpc_method_handlers(service, servicer, refuse_undecodable=refuse_undecodable)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


# -- the servicer ------------------------------------------------------------------------


class RpcObserver(Protocol):
    """Told about every finished RPC: its method, final status code name and duration (metrics.py),
    and about every call or item refused to its caller (UNAUTHENTICATED, PERMISSION_DENIED)."""

    def rpc_finished(self, method: str, code: str, seconds: float) -> None: ...

    def refused(self, method: str, code: str) -> None: ...


class QuotaServicer(pb_grpc.QuotaServiceServicer):
    """quotad.v1.QuotaService over a QuotaCore.

    Register it with `add_service`: every request may then be an `Undecodable`, answered
    INVALID_ARGUMENT (or, on a stream, with an error result for that item).
    """

    def __init__(
        self, core: QuotaCore, observer: RpcObserver | None = None, authenticator: Authenticator | None = None
    ) -> None:
        self._core = core
        self._observer = observer
        self._authenticator = authenticator or Authenticator()
        self._log_rpc = rpc_logger()
        self._audit = structlog.get_logger("quotad.audit")

    def _identify(self, context: grpc.aio.ServicerContext[Any, Any], fields: dict[str, Any]) -> Caller:
        """The caller, from its bearer token or client certificate; Unauthenticated for a bad token."""
        caller = self._authenticator.caller(context.invocation_metadata() or (), context.auth_context())
        if caller.identity is not None:
            fields["caller"] = _clip(caller.identity, LOG_FIELD_BYTES)
        return caller

    def _refused(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        fields: dict[str, Any],
        error: QuotadError,
    ) -> None:
        """One audit line and one count per call or item refused to its caller."""
        if not isinstance(error, Unauthenticated | PermissionDenied):
            return
        code = (
            grpc.StatusCode.UNAUTHENTICATED
            if isinstance(error, Unauthenticated)
            else grpc.StatusCode.PERMISSION_DENIED
        )
        self._audit.warning(
            "refused",
            method=method,
            code=code.name,
            caller=fields.get("caller"),
            peer=context.peer(),
            tenant=fields.get("tenant"),
            reason=_message(error),
        )
        if self._observer is not None:
            self._observer.refused(method, code.name)

    async def _handle(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        fields: dict[str, Any],
        call: Awaitable[Response],
    ) -> Response:
        """Run one RPC: map QuotadError to its status and write the canonical log line."""
        started = time.perf_counter()
        code = "OK"
        try:
            return await call
        except QuotadError as error:
            status = _status_for(error)
            code = status.code.name
            fields["error"] = status.details
            self._refused(method, context, fields, error)
            await context.abort_with_status(status)
            raise  # unreachable: abort_with_status raises
        except BaseException as error:
            if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
                code, fields["exc_info"] = "UNKNOWN", error  # a bug: log the traceback, let gRPC say UNKNOWN
            elif not isinstance(error, grpc.aio.AbortError):
                code = "CANCELLED"
            raise
        finally:
            elapsed = time.perf_counter() - started
            if self._observer is not None:
                self._observer.rpc_finished(method, code, elapsed)
            self._log_rpc(
                code in ("UNKNOWN", "INTERNAL"),
                {"method": method, "code": code, "latency_ms": round(elapsed * 1000, 3), **fields},
            )

    # -- one item: proto -> core -> proto; raises QuotadError ---------------------------

    async def _reserve(
        self,
        request: pb.CheckAndReserveRequest | Undecodable,
        fields: dict[str, Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CheckAndReserveResponse:
        request = _decoded(request)
        fields.update(
            subject=_clip(request.subject, LOG_FIELD_BYTES),
            tenant=_clip(request.tenant, LOG_FIELD_BYTES),
            model=_clip(request.model, LOG_FIELD_BYTES),
        )
        caller = self._identify(context, fields)
        outcome = await self._core.check_and_reserve(
            _reserve_request(request, self._core.max_messages, context.time_remaining(), caller)
        )
        response = pb.CheckAndReserveResponse()
        _fill_reserve_response(response, outcome, fields)
        return response

    async def _commit(
        self,
        request: pb.CommitRequest | Undecodable,
        fields: dict[str, Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CommitResponse:
        request = _decoded(request)
        fields["reservation_id"] = _clip(request.reservation_id, LOG_FIELD_BYTES)
        caller = self._identify(context, fields)
        reservation_id, input_tokens, output_tokens, cached, written = _commit_args(request)
        outcome = await self._core.commit(
            reservation_id,
            input_tokens,
            output_tokens,
            cached,
            caller=caller,
            cache_write_input_tokens=written,
        )
        fields.update(repeat=outcome.repeat, lease_expired=outcome.lease_expired)
        return _commit_response(outcome)

    async def _reserve_result(
        self,
        request: pb.CheckAndReserveRequest | Undecodable,
        tally: dict[str, Any],
        caller: Caller | QuotadError,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CheckAndReserveResult:
        try:
            if isinstance(caller, QuotadError):
                raise caller
            outcome: ReserveOutcome | QuotadError = await self._core.check_and_reserve(
                _reserve_request(_decoded(request), self._core.max_messages, None, caller)
            )
        except QuotadError as error:
            outcome = error
            self._refused("CheckAndReserveStream", context, tally, error)
        result = pb.CheckAndReserveResult()
        _put_reserve_result(result, outcome, tally)
        return result

    async def _commit_result(
        self,
        request: pb.CommitRequest | Undecodable,
        tally: dict[str, Any],
        caller: Caller | QuotadError,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CommitResult:
        try:
            if isinstance(caller, QuotadError):
                raise caller
            reservation_id, input_tokens, output_tokens, cached, written = _commit_args(_decoded(request))
            outcome: SettleOutcome | QuotadError = await self._core.commit(
                reservation_id,
                input_tokens,
                output_tokens,
                cached,
                caller=caller,
                cache_write_input_tokens=written,
            )
        except QuotadError as error:
            outcome = error
            self._refused("CommitStream", context, tally, error)
        result = pb.CommitResult()
        _put_commit_result(result, outcome, tally)
        return result

    @staticmethod
    def _check_batch_size(count: int) -> None:
        if count > MAX_BATCH:
            raise InvalidRequest([FieldViolation("requests", f"at most {MAX_BATCH} items, got {count}")])

    # -- unary ------------------------------------------------------------------------

    async def CheckAndReserve(
        self,
        request: pb.CheckAndReserveRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CheckAndReserveResponse:
        fields: dict[str, Any] = {}
        return await self._handle("CheckAndReserve", context, fields, self._reserve(request, fields, context))

    async def Commit(
        self, request: pb.CommitRequest | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CommitResponse:
        fields: dict[str, Any] = {}
        return await self._handle("Commit", context, fields, self._commit(request, fields, context))

    async def Release(
        self, request: pb.ReleaseRequest | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseResponse:
        fields: dict[str, Any] = {}

        async def call() -> pb.ReleaseResponse:
            reservation_id = _decoded(request).reservation_id
            fields["reservation_id"] = _clip(reservation_id, LOG_FIELD_BYTES)
            outcome = await self._core.release(reservation_id, self._identify(context, fields))
            fields["repeat"] = outcome.repeat
            return pb.ReleaseResponse(refunded=_cost(outcome.reserved), repeat=outcome.repeat)

        return await self._handle("Release", context, fields, call())

    async def GetUsage(
        self, request: pb.GetUsageRequest | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUsageResponse:
        fields: dict[str, Any] = {}

        async def call() -> pb.GetUsageResponse:
            query = _decoded(request)
            fields.update(
                subject=_clip(query.subject, LOG_FIELD_BYTES), tenant=_clip(query.tenant, LOG_FIELD_BYTES)
            )
            caller = self._identify(context, fields)
            report = await self._core.get_usage(query.subject, query.tenant, query.tier, query.model, caller)
            fields.update(tenant=report.tenant, tier=report.tier)
            response = pb.GetUsageResponse(tenant=report.tenant, tier=report.tier)
            _add_limit_statuses(response.limits, report.limits)
            return response

        return await self._handle("GetUsage", context, fields, call())

    async def GetAccuracy(
        self, request: pb.GetAccuracyRequest | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAccuracyResponse:
        fields: dict[str, Any] = {}

        async def call() -> pb.GetAccuracyResponse:
            query = _decoded(request)
            fields.update(model=_clip(query.model, LOG_FIELD_BYTES), tier=_clip(query.tier, LOG_FIELD_BYTES))
            report = await self._core.accuracy(query.model, query.tier, self._identify(context, fields))
            return pb.GetAccuracyResponse(
                model=report.model,
                tier=report.tier,
                commits=report.commits,
                input_ratio=pb.Spread(p50=report.input_ratio[0], p95=report.input_ratio[1]),
                output_ratio=pb.Spread(p50=report.output_ratio[0], p95=report.output_ratio[1]),
                estimated_tokens=report.estimated_tokens,
                actual_tokens=report.actual_tokens,
                refunded_tokens=report.refunded_tokens,
                overrun_tokens=report.overrun_tokens,
                learning=report.learning,
                learned_output_tokens=report.learned_output_tokens or 0,
                input_overrun_tokens=report.input_overrun_tokens,
                output_overrun_tokens=report.output_overrun_tokens,
                input_overrun_commits=report.input_overrun_commits,
                output_overrun_commits=report.output_overrun_commits,
                unreserved_output_commits=report.unreserved_output_commits,
            )

        return await self._handle("GetAccuracy", context, fields, call())

    # -- batches and streams: one log line per call, with the tally of its items ------

    async def CheckAndReserveBatch(
        self,
        request: pb.CheckAndReserveBatchRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CheckAndReserveBatchResponse:
        fields: dict[str, Any] = {"items": 0, "allowed": 0, "denied": 0, "errors": 0}

        async def call() -> pb.CheckAndReserveBatchResponse:
            requests = _decoded(request).requests
            fields["items"] = len(requests)
            self._check_batch_size(len(requests))
            caller = self._identify(context, fields)
            translated = _reserve_requests(
                requests, self._core.max_messages, context.time_remaining(), caller
            )
            decided = iter(
                await self._core.check_and_reserve_many(
                    [item for item in translated if isinstance(item, ReserveRequest)]
                )
            )
            response = pb.CheckAndReserveBatchResponse()
            for item in translated:
                outcome = item if isinstance(item, InvalidRequest) else next(decided)
                if isinstance(outcome, QuotadError):
                    self._refused("CheckAndReserveBatch", context, fields, outcome)
                _put_reserve_result(response.results.add(), outcome, fields)
            return response

        return await self._handle("CheckAndReserveBatch", context, fields, call())

    async def CommitBatch(
        self, request: pb.CommitBatchRequest | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CommitBatchResponse:
        fields: dict[str, Any] = {"items": 0, "committed": 0, "errors": 0}

        async def call() -> pb.CommitBatchResponse:
            requests = _decoded(request).requests
            fields["items"] = len(requests)
            self._check_batch_size(len(requests))
            caller = self._identify(context, fields)
            outcomes = await self._core.commit_many([_commit_args(r) for r in requests], caller)
            response = pb.CommitBatchResponse()
            for outcome in outcomes:
                if isinstance(outcome, QuotadError):
                    self._refused("CommitBatch", context, fields, outcome)
                _put_commit_result(response.results.add(), outcome, fields)
            return response

        return await self._handle("CommitBatch", context, fields, call())

    def _stream_caller(
        self, context: grpc.aio.ServicerContext[Any, Any], tally: dict[str, Any]
    ) -> Caller | QuotadError:
        """A stream's caller, once for all its items; a bad token makes every item's answer."""
        try:
            return self._identify(context, tally)
        except QuotadError as error:
            return error

    async def _stream(
        self,
        method: str,
        items: AsyncIterator[Item],
        tally: dict[str, Any],
        decide: Callable[[Item], Awaitable[Result]],
        answer: Callable[[Item, Result], Response],
    ) -> AsyncIterator[Response]:
        """Serve one stream: items decided concurrently, answered in order; one log line at its end."""
        started, code = time.perf_counter(), "OK"
        try:
            async for item, result in _in_order(items, decide):
                tally["items"] += 1
                yield answer(item, result)
        except Exception as error:
            code, tally["exc_info"] = "UNKNOWN", error  # a bug: log the traceback, let gRPC say UNKNOWN
            raise
        except BaseException:  # cancelled, or the caller went away
            code = "CANCELLED"
            raise
        finally:
            elapsed = time.perf_counter() - started
            if self._observer is not None:
                self._observer.rpc_finished(method, code, elapsed)
            self._log_rpc(
                code == "UNKNOWN",
                {"method": method, "code": code, "latency_ms": round(elapsed * 1000, 3), **tally},
            )

    async def CheckAndReserveStream(
        self,
        request_iterator: AsyncIterator[pb.CheckAndReserveStreamRequest | Undecodable],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.CheckAndReserveStreamResponse]:
        tally: dict[str, Any] = {"items": 0, "allowed": 0, "denied": 0, "errors": 0}
        caller = self._stream_caller(context, tally)
        # An async generator itself: that is how grpc.aio tells a streaming handler.
        async for answer in self._stream(
            "CheckAndReserveStream",
            request_iterator,
            tally,
            lambda item: self._reserve_result(
                item if isinstance(item, Undecodable) else item.request, tally, caller, context
            ),
            lambda item, result: pb.CheckAndReserveStreamResponse(
                request_id=_request_id(item), result=result
            ),
        ):
            yield answer

    async def CommitStream(
        self,
        request_iterator: AsyncIterator[pb.CommitStreamRequest | Undecodable],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.CommitStreamResponse]:
        tally: dict[str, Any] = {"items": 0, "committed": 0, "errors": 0}
        caller = self._stream_caller(context, tally)
        async for answer in self._stream(
            "CommitStream",
            request_iterator,
            tally,
            lambda item: self._commit_result(
                item if isinstance(item, Undecodable) else item.request, tally, caller, context
            ),
            lambda item, result: pb.CommitStreamResponse(request_id=_request_id(item), result=result),
        ):
            yield answer


def _request_id(item: pb.CheckAndReserveStreamRequest | pb.CommitStreamRequest | Undecodable) -> str:
    """The request_id a stream answer echoes. An undecodable item has none to read: its answer,
    in its place in the stream's order, is what identifies it."""
    return "" if isinstance(item, Undecodable) else item.request_id
