"""The gRPC servicer: proto <-> model, errors -> status codes, one log line per RPC.

Nothing is decided here; QuotaCore decides.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc

from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.errors import FailedPrecondition, InvalidRequest, NotFound, QuotadError, StoreUnavailable
from quotad_server.model import (
    Algorithm,
    Cost,
    Decision,
    DenyReason,
    LimitStatus,
    Metric,
    Scope,
)

Response = TypeVar("Response")
_log = structlog.get_logger("quotad.rpc")

_DECISION = {Decision.ALLOWED: pb.DECISION_ALLOWED, Decision.DENIED: pb.DECISION_DENIED}
_DENY_REASON = {
    DenyReason.LIMIT_EXCEEDED: pb.DENY_REASON_LIMIT_EXCEEDED,
    DenyReason.EXCEEDS_CAPACITY: pb.DENY_REASON_EXCEEDS_CAPACITY,
}
_SCOPE = {Scope.SUBJECT: pb.SCOPE_SUBJECT, Scope.TENANT: pb.SCOPE_TENANT, Scope.GLOBAL: pb.SCOPE_GLOBAL}
_METRIC = {
    Metric.REQUESTS: pb.METRIC_REQUESTS,
    Metric.INPUT_TOKENS: pb.METRIC_INPUT_TOKENS,
    Metric.OUTPUT_TOKENS: pb.METRIC_OUTPUT_TOKENS,
    Metric.TOTAL_TOKENS: pb.METRIC_TOTAL_TOKENS,
    Metric.CONCURRENT: pb.METRIC_CONCURRENT,
}
_ALGORITHM = {
    Algorithm.TOKEN_BUCKET: pb.ALGORITHM_TOKEN_BUCKET,
    Algorithm.SLIDING_WINDOW: pb.ALGORITHM_SLIDING_WINDOW,
    Algorithm.CONCURRENCY: pb.ALGORITHM_CONCURRENCY,
}


def duration_us(us: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def timestamp_us(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def _cost(cost: Cost) -> pb.Cost:
    return pb.Cost(requests=cost.requests, input_tokens=cost.input_tokens, output_tokens=cost.output_tokens)


def _limit_status(status: LimitStatus) -> pb.LimitStatus:
    limit = status.limit
    message = pb.LimitStatus(
        name=limit.name,
        scope=_SCOPE[limit.scope],
        metric=_METRIC[limit.metric],
        algorithm=_ALGORITHM[limit.algorithm],
        limit=limit.limit,
        remaining=status.remaining,
        reset_after=duration_us(status.reset_after_us),
        denied=status.denied,
        binding=status.binding,
    )
    if limit.period_us:
        message.period.CopyFrom(duration_us(limit.period_us))
    return message


def _status_for(error: QuotadError) -> grpc.Status:
    code, details = code_pb2.INTERNAL, []
    if isinstance(error, InvalidRequest):
        code = code_pb2.INVALID_ARGUMENT
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    elif isinstance(error, NotFound):
        code = code_pb2.NOT_FOUND
    elif isinstance(error, FailedPrecondition):
        code = code_pb2.FAILED_PRECONDITION
    elif isinstance(error, StoreUnavailable):
        code = code_pb2.UNAVAILABLE
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=str(error), details=details)
    )
    return status


class RpcObserver(Protocol):
    """Told about every finished RPC: its method, final status code name and duration (metrics.py)."""

    def rpc_finished(self, method: str, code: str, seconds: float) -> None: ...


class QuotaServicer(pb_grpc.QuotaServiceServicer):
    """quotad.v1.QuotaService over a QuotaCore."""

    def __init__(self, core: QuotaCore, observer: RpcObserver | None = None) -> None:
        self._core = core
        self._observer = observer

    async def _handle(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        fields: dict[str, Any],
        call: Callable[[], Awaitable[Response]],
    ) -> Response:
        """Run one RPC: map QuotadError to its status and write the canonical log line."""
        started = time.perf_counter()
        code = "OK"
        try:
            return await call()
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
            log = _log.error if code in ("UNKNOWN", "INTERNAL") else _log.info
            log(
                "rpc",
                method=method,
                code=code,
                latency_ms=round(elapsed * 1000, 3),
                **fields,
            )

    async def CheckAndReserve(
        self, request: pb.CheckAndReserveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CheckAndReserveResponse:
        fields: dict[str, Any] = {
            "subject": request.subject,
            "tenant": request.tenant,
            "model": request.model,
        }

        async def call() -> pb.CheckAndReserveResponse:
            lease_us = None
            if request.HasField("lease"):
                lease_us = request.lease.seconds * 1_000_000 + request.lease.nanos // 1000
            outcome = await self._core.check_and_reserve(
                ReserveRequest(
                    subject=request.subject,
                    tenant=request.tenant,
                    tier=request.tier,
                    model=request.model,
                    input_tokens=request.input_tokens,
                    max_output_tokens=request.max_output_tokens,
                    lease_us=lease_us,
                    idempotency_key=request.idempotency_key,
                )
            )
            fields.update(tenant=outcome.tenant, tier=outcome.tier, decision=outcome.decision.value)
            response = pb.CheckAndReserveResponse(
                decision=_DECISION[outcome.decision],
                tenant=outcome.tenant,
                tier=outcome.tier,
                limits=[_limit_status(s) for s in outcome.limits],
                replayed=outcome.replayed,
            )
            if outcome.decision is Decision.ALLOWED:
                assert outcome.reserved is not None
                response.reservation_id = outcome.reservation_id
                response.lease_expires_at.CopyFrom(timestamp_us(outcome.lease_expires_at_us))
                response.reserved.CopyFrom(_cost(outcome.reserved))
                fields["reservation_id"] = outcome.reservation_id
            else:
                assert outcome.deny_reason is not None
                response.deny_reason = _DENY_REASON[outcome.deny_reason]
                response.binding_limit = outcome.binding_limit or ""
                if outcome.retry_after_us is not None:
                    response.retry_after.CopyFrom(duration_us(outcome.retry_after_us))
                fields.update(binding_limit=outcome.binding_limit, retry_after_us=outcome.retry_after_us)
            return response

        return await self._handle("CheckAndReserve", context, fields, call)

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CommitResponse:
        fields: dict[str, Any] = {"reservation_id": request.reservation_id}

        async def call() -> pb.CommitResponse:
            outcome = await self._core.commit(
                request.reservation_id, request.input_tokens, request.output_tokens
            )
            fields.update(repeat=outcome.repeat, lease_expired=outcome.lease_expired)
            return pb.CommitResponse(
                reserved=_cost(outcome.reserved),
                committed=_cost(outcome.committed),
                repeat=outcome.repeat,
                lease_expired=outcome.lease_expired,
            )

        return await self._handle("Commit", context, fields, call)

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseResponse:
        fields: dict[str, Any] = {"reservation_id": request.reservation_id}

        async def call() -> pb.ReleaseResponse:
            outcome = await self._core.release(request.reservation_id)
            fields["repeat"] = outcome.repeat
            return pb.ReleaseResponse(refunded=_cost(outcome.reserved), repeat=outcome.repeat)

        return await self._handle("Release", context, fields, call)

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUsageResponse:
        fields: dict[str, Any] = {"subject": request.subject, "tenant": request.tenant}

        async def call() -> pb.GetUsageResponse:
            report = await self._core.get_usage(request.subject, request.tenant, request.tier, request.model)
            fields.update(tenant=report.tenant, tier=report.tier)
            return pb.GetUsageResponse(
                tenant=report.tenant, tier=report.tier, limits=[_limit_status(s) for s in report.limits]
            )

        return await self._handle("GetUsage", context, fields, call)
