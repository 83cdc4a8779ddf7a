"""The gRPC servicer: proto <-> model, errors -> status codes, one log line per RPC.

Nothing is decided here; QuotaCore decides.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc

from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidRequest,
    NotFound,
    NotReady,
    QuotadError,
    StoreUnavailable,
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
    Priority,
    ReserveOutcome,
    Scope,
    SettleOutcome,
)
from quotad_server.tokens import ChatMessage

Response = TypeVar("Response")
Item = TypeVar("Item")
Result = TypeVar("Result")
MAX_BATCH = 1000
STREAM_WINDOW = 256  # items of one stream decided concurrently before reading more

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
    else:
        code = grpc.StatusCode.INTERNAL
    number: int = code.value[0]
    return number


def _status_for(error: QuotadError) -> grpc.Status:
    """The status a unary call fails with: field violations travel as google.rpc.BadRequest."""
    details = []
    if isinstance(error, InvalidRequest):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    status_proto = status_pb2.Status(code=_code_of(error), message=str(error), details=details)
    status: grpc.Status = rpc_status.to_status(status_proto)
    return status


def _item_error(error: QuotadError) -> pb.Error:
    """The error result of one batch or stream item."""
    violations = error.violations if isinstance(error, InvalidRequest) else ()
    return pb.Error(
        code=_code_of(error),
        message=str(error),
        field_violations=[pb.FieldViolation(field=v.field, description=v.description) for v in violations],
    )


def _commit_args(request: pb.CommitRequest) -> tuple[str, int, int, int]:
    """QuotaCore.commit's arguments: reservation id, input, output and cached input tokens."""
    return request.reservation_id, request.input_tokens, request.output_tokens, request.cached_input_tokens


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


def _micros(duration: duration_pb2.Duration) -> int:
    return duration.seconds * 1_000_000 + duration.nanos // 1000


def _reserve_request(request: pb.CheckAndReserveRequest) -> ReserveRequest:
    lease_us = _micros(request.lease) if request.HasField("lease") else None
    priority = None
    if request.priority != pb.PRIORITY_UNSPECIFIED:
        priority = _PRIORITY_IN.get(request.priority)
        if priority is None:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "priority", f"unknown priority {request.priority}; use PRIORITY_LOW, _NORMAL or _HIGH"
                    )
                ]
            )
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
        messages=tuple(ChatMessage(m.role, m.content, m.name) for m in request.messages)
        if request.messages
        else (),
        priority=priority,
        max_wait_us=_micros(request.max_wait) if request.HasField("max_wait") else 0,
    )


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
    if outcome.decision is Decision.ALLOWED:
        assert outcome.reserved is not None
        response.counted_input_tokens = outcome.counted_input_tokens
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


class RpcObserver(Protocol):
    """Told about every finished RPC: its method, final status code name and duration (metrics.py)."""

    def rpc_finished(self, method: str, code: str, seconds: float) -> None: ...


class QuotaServicer(pb_grpc.QuotaServiceServicer):
    """quotad.v1.QuotaService over a QuotaCore."""

    def __init__(self, core: QuotaCore, observer: RpcObserver | None = None) -> None:
        self._core = core
        self._observer = observer
        self._log_rpc = rpc_logger()

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
            fields["error"] = str(error)
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
        self, request: pb.CheckAndReserveRequest, fields: dict[str, Any]
    ) -> pb.CheckAndReserveResponse:
        outcome = await self._core.check_and_reserve(_reserve_request(request))
        response = pb.CheckAndReserveResponse()
        _fill_reserve_response(response, outcome, fields)
        return response

    async def _commit(self, request: pb.CommitRequest, fields: dict[str, Any]) -> pb.CommitResponse:
        outcome = await self._core.commit(*_commit_args(request))
        fields.update(repeat=outcome.repeat, lease_expired=outcome.lease_expired)
        return _commit_response(outcome)

    async def _reserve_result(
        self, request: pb.CheckAndReserveRequest, tally: dict[str, Any]
    ) -> pb.CheckAndReserveResult:
        try:
            outcome: ReserveOutcome | QuotadError = await self._core.check_and_reserve(
                _reserve_request(request)
            )
        except QuotadError as error:
            outcome = error
        result = pb.CheckAndReserveResult()
        _put_reserve_result(result, outcome, tally)
        return result

    async def _commit_result(self, request: pb.CommitRequest, tally: dict[str, Any]) -> pb.CommitResult:
        try:
            outcome: SettleOutcome | QuotadError = await self._core.commit(*_commit_args(request))
        except QuotadError as error:
            outcome = error
        result = pb.CommitResult()
        _put_commit_result(result, outcome, tally)
        return result

    @staticmethod
    def _check_batch_size(count: int) -> None:
        if count > MAX_BATCH:
            raise InvalidRequest([FieldViolation("requests", f"at most {MAX_BATCH} items, got {count}")])

    # -- unary ------------------------------------------------------------------------

    async def CheckAndReserve(
        self, request: pb.CheckAndReserveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CheckAndReserveResponse:
        fields: dict[str, Any] = {
            "subject": request.subject,
            "tenant": request.tenant,
            "model": request.model,
        }
        return await self._handle("CheckAndReserve", context, fields, self._reserve(request, fields))

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CommitResponse:
        fields: dict[str, Any] = {"reservation_id": request.reservation_id}
        return await self._handle("Commit", context, fields, self._commit(request, fields))

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseResponse:
        fields: dict[str, Any] = {"reservation_id": request.reservation_id}

        async def call() -> pb.ReleaseResponse:
            outcome = await self._core.release(request.reservation_id)
            fields["repeat"] = outcome.repeat
            return pb.ReleaseResponse(refunded=_cost(outcome.reserved), repeat=outcome.repeat)

        return await self._handle("Release", context, fields, call())

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUsageResponse:
        fields: dict[str, Any] = {"subject": request.subject, "tenant": request.tenant}

        async def call() -> pb.GetUsageResponse:
            report = await self._core.get_usage(request.subject, request.tenant, request.tier, request.model)
            fields.update(tenant=report.tenant, tier=report.tier)
            response = pb.GetUsageResponse(tenant=report.tenant, tier=report.tier)
            _add_limit_statuses(response.limits, report.limits)
            return response

        return await self._handle("GetUsage", context, fields, call())

    async def GetAccuracy(
        self, request: pb.GetAccuracyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAccuracyResponse:
        fields: dict[str, Any] = {"model": request.model, "tier": request.tier}

        async def call() -> pb.GetAccuracyResponse:
            report = await self._core.accuracy(request.model, request.tier)
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
            )

        return await self._handle("GetAccuracy", context, fields, call())

    # -- batches and streams: one log line per call, with the tally of its items ------

    async def CheckAndReserveBatch(
        self, request: pb.CheckAndReserveBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CheckAndReserveBatchResponse:
        fields: dict[str, Any] = {"items": len(request.requests), "allowed": 0, "denied": 0, "errors": 0}

        async def call() -> pb.CheckAndReserveBatchResponse:
            self._check_batch_size(len(request.requests))
            outcomes = await self._core.check_and_reserve_many(
                [_reserve_request(r) for r in request.requests]
            )
            response = pb.CheckAndReserveBatchResponse()
            for outcome in outcomes:
                _put_reserve_result(response.results.add(), outcome, fields)
            return response

        return await self._handle("CheckAndReserveBatch", context, fields, call())

    async def CommitBatch(
        self, request: pb.CommitBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CommitBatchResponse:
        fields: dict[str, Any] = {"items": len(request.requests), "committed": 0, "errors": 0}

        async def call() -> pb.CommitBatchResponse:
            self._check_batch_size(len(request.requests))
            outcomes = await self._core.commit_many([_commit_args(r) for r in request.requests])
            response = pb.CommitBatchResponse()
            for outcome in outcomes:
                _put_commit_result(response.results.add(), outcome, fields)
            return response

        return await self._handle("CommitBatch", context, fields, call())

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
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            elapsed = time.perf_counter() - started
            if self._observer is not None:
                self._observer.rpc_finished(method, code, elapsed)
            self._log_rpc(
                False, {"method": method, "code": code, "latency_ms": round(elapsed * 1000, 3), **tally}
            )

    async def CheckAndReserveStream(
        self,
        request_iterator: AsyncIterator[pb.CheckAndReserveStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.CheckAndReserveStreamResponse]:
        tally: dict[str, Any] = {"items": 0, "allowed": 0, "denied": 0, "errors": 0}
        # An async generator itself: that is how grpc.aio tells a streaming handler.
        async for answer in self._stream(
            "CheckAndReserveStream",
            request_iterator,
            tally,
            lambda item: self._reserve_result(item.request, tally),
            lambda item, result: pb.CheckAndReserveStreamResponse(request_id=item.request_id, result=result),
        ):
            yield answer

    async def CommitStream(
        self,
        request_iterator: AsyncIterator[pb.CommitStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.CommitStreamResponse]:
        tally: dict[str, Any] = {"items": 0, "committed": 0, "errors": 0}
        async for answer in self._stream(
            "CommitStream",
            request_iterator,
            tally,
            lambda item: self._commit_result(item.request, tally),
            lambda item, result: pb.CommitStreamResponse(request_id=item.request_id, result=result),
        ):
            yield answer
