"""A small typed asyncio client over the generated stub.

A denial is a value (`decision == DECISION_DENIED`), not an exception; gRPC
errors (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...) raise grpc.aio.AioRpcError.
"""

from __future__ import annotations

from datetime import timedelta
from types import TracebackType

import grpc
from google.protobuf import duration_pb2

from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc


class QuotaClient:
    """One channel to quotad. Use as `async with QuotaClient(target) as client:`."""

    def __init__(self, target: str, *, timeout: float = 1.0, channel: grpc.aio.Channel | None = None) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.QuotaServiceStub(self._channel)
        self._timeout = timeout

    async def __aenter__(self) -> QuotaClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def check_and_reserve(
        self,
        subject: str,
        *,
        tenant: str = "",
        tier: str = "",
        model: str = "",
        input_tokens: int = 0,
        max_output_tokens: int = 0,
        lease: timedelta | None = None,
        idempotency_key: str = "",
    ) -> pb.CheckAndReserveResponse:
        """Reserve the estimated cost of one call on every limit, or get a denial."""
        request = pb.CheckAndReserveRequest(
            subject=subject,
            tenant=tenant,
            tier=tier,
            model=model,
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
            idempotency_key=idempotency_key,
        )
        if lease is not None:
            duration = duration_pb2.Duration()
            duration.FromTimedelta(lease)
            request.lease.CopyFrom(duration)
        return await self._stub.CheckAndReserve(request, timeout=self._timeout)

    async def commit(
        self, reservation_id: str, *, input_tokens: int, output_tokens: int
    ) -> pb.CommitResponse:
        """Settle a reservation with the call's actual usage."""
        request = pb.CommitRequest(
            reservation_id=reservation_id, input_tokens=input_tokens, output_tokens=output_tokens
        )
        return await self._stub.Commit(request, timeout=self._timeout)

    async def release(self, reservation_id: str) -> pb.ReleaseResponse:
        """Give a reservation back: the call never happened."""
        return await self._stub.Release(
            pb.ReleaseRequest(reservation_id=reservation_id), timeout=self._timeout
        )

    async def get_usage(
        self, subject: str, *, tenant: str = "", tier: str = "", model: str = ""
    ) -> pb.GetUsageResponse:
        """The status of every limit that applies to a caller."""
        request = pb.GetUsageRequest(subject=subject, tenant=tenant, tier=tier, model=model)
        return await self._stub.GetUsage(request, timeout=self._timeout)
