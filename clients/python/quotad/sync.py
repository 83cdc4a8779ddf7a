"""The blocking client: `SyncQuotaClient`, and `reserve()` as a context manager.

The same calls, settings and semantics as the asyncio `QuotaClient`, for code that
does not run an event loop (threads, WSGI, scripts).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

import grpc

from quotad._common import (
    DEFAULT_RETRY_BACKOFF_S,
    DEFAULT_TIMEOUT_S,
    Metadata,
    MetadataProvider,
    Outcome,
    Settings,
    commit_request,
    new_idempotency_key,
    reserve_request,
    seconds,
    wait_before_retrying,
)
from quotad._transport import TlsConfig, Token, transport
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc


class SyncQuotaClient:
    """One channel to quotad. Use as `with SyncQuotaClient("host:50051") as quota:`.

    The arguments mean what they mean for `quotad.QuotaClient`; `channel` is a
    blocking `grpc.Channel`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: TlsConfig | None = None,
        token: Token | None = None,
        allow_plaintext_token: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        metadata_provider: MetadataProvider | None = None,
        options: Sequence[tuple[str, Any]] = (),
        retries: int | None = None,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF_S,
        channel: grpc.Channel | None = None,
    ) -> None:
        reach = transport(
            tls=tls,
            credentials=credentials,
            token=token,
            allow_plaintext_token=allow_plaintext_token,
            metadata_provider=metadata_provider,
            options=options,
            own_channel=channel is not None,
        )
        self._settings = Settings(timeout, tuple(metadata), reach.metadata_provider, retries, retry_backoff)
        if channel is None:
            if reach.credentials is None:
                channel = grpc.insecure_channel(target, options=reach.options)
            else:
                channel = grpc.secure_channel(target, reach.credentials, options=reach.options)
        self._channel = channel
        self._stub = pb_grpc.QuotaServiceStub(channel)

    def __enter__(self) -> SyncQuotaClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        """One logical call: the deadline, the metadata, and UNAVAILABLE retried until the deadline.

        Every attempt sends the same request, so a CheckAndReserve keeps its idempotency key; a
        CheckAndReserve with a server wait gets a deadline longer by as much, and a retry asks for
        what is left of the wait (see `Attempts`).
        """
        attempts = self._settings.attempts(request)
        while True:
            sent, timeout = attempts.attempt(request)
            try:
                return method(sent, timeout=timeout, metadata=self._settings.call_metadata())
            except grpc.RpcError as error:
                call: grpc.Call = error  # type: ignore[assignment]  # a failed call's error is the Call
                delay = attempts.delay_before_retry(call.code())
                if delay is None:
                    raise attempts.failure(error) from error
                time.sleep(delay)

    def check_and_reserve(
        self,
        subject: str,
        *,
        tenant: str = "",
        tier: str = "",
        model: str = "",
        input_tokens: int = 0,
        max_output_tokens: int = 0,
        lease: timedelta | None = None,
        idempotency_key: str | None = None,
        priority: pb.Priority.ValueType = pb.PRIORITY_UNSPECIFIED,
        server_wait: timedelta | None = None,
    ) -> pb.CheckAndReserveResponse:
        """Reserve the estimated cost of one call on every limit, or get a denial (a value).

        As `QuotaClient.check_and_reserve`: one idempotency key per call, sent by every attempt.
        """
        request = reserve_request(
            subject,
            tenant=tenant,
            tier=tier,
            model=model,
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
            lease=lease,
            idempotency_key=idempotency_key or new_idempotency_key(),
            priority=priority,
            server_wait=server_wait,
        )
        response: pb.CheckAndReserveResponse = self._call(self._stub.CheckAndReserve, request)
        return response

    def commit(
        self,
        reservation_id: str,
        usage: object | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        exclude_cached: bool = False,
    ) -> pb.CommitResponse:
        """Settle a reservation with the call's actual usage (a usage object, or numbers)."""
        request = commit_request(
            reservation_id,
            usage,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            exclude_cached=exclude_cached,
        )
        response: pb.CommitResponse = self._call(self._stub.Commit, request)
        return response

    def release(self, reservation_id: str) -> pb.ReleaseResponse:
        """Give a reservation back: the call never happened."""
        response: pb.ReleaseResponse = self._call(
            self._stub.Release, pb.ReleaseRequest(reservation_id=reservation_id)
        )
        return response

    def get_usage(
        self, subject: str, *, tenant: str = "", tier: str = "", model: str = ""
    ) -> pb.GetUsageResponse:
        """The status of every limit that applies to a caller; changes nothing."""
        request = pb.GetUsageRequest(subject=subject, tenant=tenant, tier=tier, model=model)
        response: pb.GetUsageResponse = self._call(self._stub.GetUsage, request)
        return response

    def reserve(
        self,
        subject: str,
        *,
        tenant: str = "",
        tier: str = "",
        model: str = "",
        input_tokens: int = 0,
        max_output_tokens: int = 0,
        lease: timedelta | None = None,
        idempotency_key: str | None = None,
        max_wait: float | timedelta = 0,
        exclude_cached: bool = False,
        priority: pb.Priority.ValueType = pb.PRIORITY_UNSPECIFIED,
        server_wait: timedelta | None = None,
    ) -> Reservation:
        """`with quota.reserve(...) as reservation:` as `QuotaClient.reserve`, blocking."""
        request = reserve_request(
            subject,
            tenant=tenant,
            tier=tier,
            model=model,
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
            lease=lease,
            idempotency_key=idempotency_key or new_idempotency_key(),
            priority=priority,
            server_wait=server_wait,
        )
        return Reservation(self, request, seconds(max_wait), exclude_cached)


class Reservation:
    """One reservation held for the body of a `with`; see SyncQuotaClient.reserve."""

    def __init__(
        self,
        client: SyncQuotaClient,
        request: pb.CheckAndReserveRequest,
        max_wait_s: float,
        exclude_cached: bool,
    ) -> None:
        self._client = client
        self._request = request
        self._max_wait_s = max_wait_s
        self._exclude_cached = exclude_cached
        self._outcome = Outcome()
        self.response = pb.CheckAndReserveResponse()

    @property
    def reservation_id(self) -> str:
        return self.response.reservation_id

    def record(
        self,
        usage: object | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """Record what the LLM call used, to commit on exit; as `AsyncReservation.record`."""
        self._outcome.record(usage, input_tokens, output_tokens)

    def commit(
        self,
        usage: object | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> pb.CommitResponse:
        """Commit now (the exit then settles nothing)."""
        self._outcome.settled = True
        return self._client.commit(
            self.reservation_id,
            usage,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            exclude_cached=self._exclude_cached,
        )

    def release(self) -> pb.ReleaseResponse:
        """Release now (the exit then settles nothing)."""
        self._outcome.settled = True
        return self._client.release(self.reservation_id)

    def __enter__(self) -> Reservation:
        give_up_at = time.monotonic() + self._max_wait_s
        while True:
            response: pb.CheckAndReserveResponse = self._client._call(
                self._client._stub.CheckAndReserve, self._request
            )
            if response.decision == pb.DECISION_ALLOWED:
                self.response = response
                return self
            # A denial writes nothing, so asking again with the same idempotency key is safe.
            time.sleep(wait_before_retrying(response, give_up_at - time.monotonic()))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._outcome.settled:
            return
        if exc is None:
            self.commit(self._outcome.commit_usage(self.response.reserved))
            return
        # The body failed. What it recorded was spent (the LLM answered, then something broke):
        # commit it. Nothing recorded: the call did not happen, give the reservation back.
        try:
            if self._outcome.recorded:
                self.commit(self._outcome.commit_usage(self.response.reserved))
            else:
                self.release()
        except Exception as settle_error:  # the body's exception matters more; the lease frees the slot
            action = "committing" if self._outcome.recorded else "releasing"
            exc.add_note(f"quotad: {action} reservation {self.reservation_id} failed: {settle_error}")
