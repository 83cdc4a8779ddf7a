"""The asyncio client: `QuotaClient`, and `reserve()` as an async context manager.

A denial from `check_and_reserve` is a value (`decision == DECISION_DENIED`); only
`reserve()`, whose body cannot run without the quota, raises `QuotaDenied`. Error
statuses raise the QuotadError subclasses of `quotad.errors`.
"""

from __future__ import annotations

import asyncio
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


class QuotaClient:
    """One channel to quotad. Use as `async with QuotaClient("host:50051") as quota:`.

    - `timeout`: the deadline of each call in seconds (default 2), all of its attempts and the
      sleeps between them included. A CheckAndReserve with `server_wait` gets that much more.
    - `tls`: `TlsConfig(ca=..., cert=..., key=...)`: TLS, verifying quotad against the `ca`
      bundle (None: the system's roots), with a client certificate and key for mutual TLS.
      Plaintext when neither `tls` nor `credentials` is given.
    - `token`: a bearer token, or a callable returning the current one (asked before every
      attempt), sent as `authorization: Bearer <token>` on every RPC. Over TLS it travels as gRPC
      call credentials; over plaintext it is refused (ValueError) unless
      `allow_plaintext_token=True`, for a network that encrypts for you (a mesh sidecar) or a
      test on loopback.
    - `credentials`: your own `grpc.ChannelCredentials` instead of `tls` (a `token` is
      composed with them).
    - `metadata`: sent with every RPC, e.g. `[("x-team", "search")]`; `metadata_provider` is
      called before every RPC for metadata that changes.
    - `options`: gRPC channel options, e.g. `[("grpc.keepalive_time_ms", 30_000)]`.
    - `retries`: how many times an UNAVAILABLE call may be retried; None (the default): as
      many times as fit in `timeout`. The backoff starts at `retry_backoff` seconds (default
      0.05), doubles up to 1 s, and is jittered (50 to 100 % of it). Safe: every call is
      idempotent on the server, and a CheckAndReserve sends the same idempotency key on every
      attempt (see `quotad._common.is_retryable`).
    - `channel`: use this channel instead of opening one (`credentials`/`options` unused;
      `tls` and `token` are refused: set them on that channel).
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
        channel: grpc.aio.Channel | None = None,
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
                channel = grpc.aio.insecure_channel(target, options=reach.options)
            else:
                channel = grpc.aio.secure_channel(target, reach.credentials, options=reach.options)
        self._channel = channel
        self._stub = pb_grpc.QuotaServiceStub(channel)

    async def __aenter__(self) -> QuotaClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        """One logical call: the deadline, the metadata, and UNAVAILABLE retried until the deadline.

        Every attempt sends the same request, so a CheckAndReserve keeps its idempotency key; a
        CheckAndReserve with a server wait gets a deadline longer by as much, and a retry asks for
        what is left of the wait (see `Attempts`).
        """
        attempts = self._settings.attempts(request)
        while True:
            sent, timeout = attempts.attempt(request)
            try:
                return await method(sent, timeout=timeout, metadata=self._settings.call_metadata())
            except grpc.aio.AioRpcError as error:
                delay = attempts.delay_before_retry(error.code())
                if delay is None:
                    raise attempts.failure(error) from error
                await asyncio.sleep(delay)

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
        idempotency_key: str | None = None,
        priority: pb.Priority.ValueType = pb.PRIORITY_UNSPECIFIED,
        server_wait: timedelta | None = None,
    ) -> pb.CheckAndReserveResponse:
        """Reserve the estimated cost of one call on every limit, or get a denial (a value).

        Without an `idempotency_key` (None or "") one is generated for this call, and every
        attempt sends it, so retries never reserve twice: an answer with `replayed` set is the
        reservation an earlier attempt made. `priority` orders shared capacity (the tier's default
        when unspecified); with `server_wait` quotad holds the request in its waiting line, up to
        that long, and admits it when it fits (the call's deadline is longer by as much).
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
        response: pb.CheckAndReserveResponse = await self._call(self._stub.CheckAndReserve, request)
        return response

    async def commit(
        self,
        reservation_id: str,
        usage: object | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        exclude_cached: bool = False,
    ) -> pb.CommitResponse:
        """Settle a reservation with the call's actual usage.

        `usage` is an OpenAI or Anthropic usage object (see `quotad.usage`); or pass
        `input_tokens` and `output_tokens`. `exclude_cached` leaves prompt-cache reads
        uncharged.
        """
        request = commit_request(
            reservation_id,
            usage,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            exclude_cached=exclude_cached,
        )
        response: pb.CommitResponse = await self._call(self._stub.Commit, request)
        return response

    async def release(self, reservation_id: str) -> pb.ReleaseResponse:
        """Give a reservation back: the call never happened."""
        response: pb.ReleaseResponse = await self._call(
            self._stub.Release, pb.ReleaseRequest(reservation_id=reservation_id)
        )
        return response

    async def get_usage(
        self, subject: str, *, tenant: str = "", tier: str = "", model: str = ""
    ) -> pb.GetUsageResponse:
        """The status of every limit that applies to a caller; changes nothing."""
        request = pb.GetUsageRequest(subject=subject, tenant=tenant, tier=tier, model=model)
        response: pb.GetUsageResponse = await self._call(self._stub.GetUsage, request)
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
    ) -> AsyncReservation:
        """`async with quota.reserve(...) as reservation:` reserve, run the body, settle.

        On enter: reserve, or raise QuotaDenied; with `server_wait`, quotad holds the request in
        its waiting line, up to that long, and admits it when it fits (each CheckAndReserve's
        deadline is longer by as much); with `max_wait` (seconds), a denial that fits within it
        is waited out here (sleeping its retry_after) and asked again. On exit:
        commit what the body recorded with `reservation.record(...)`, the reserved estimate
        standing in for what it did not; that holds when the body raises after recording,
        since the LLM call happened. A body that raises before recording anything: release.
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
        return AsyncReservation(self, request, seconds(max_wait), exclude_cached)


class AsyncReservation:
    """One reservation held for the body of an `async with`; see QuotaClient.reserve."""

    def __init__(
        self, client: QuotaClient, request: pb.CheckAndReserveRequest, max_wait_s: float, exclude_cached: bool
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
        """Record what the LLM call used, to commit on exit (even if the body then raises).

        A provider usage object or a whole response (see `quotad.usage`), or plain
        `input_tokens=` and `output_tokens=`; a later report replaces an earlier one. For a
        stream, record every event or chunk as it arrives: those without usage are skipped, an
        Anthropic `message_delta` updates its `message_start`, and an OpenAI chunk with `usage`
        (`stream_options={"include_usage": True}`) gives all of it. None records nothing.
        Raises TypeError for what cannot be read.
        """
        self._outcome.record(usage, input_tokens, output_tokens)

    async def commit(
        self,
        usage: object | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> pb.CommitResponse:
        """Commit now (the exit then settles nothing)."""
        self._outcome.settled = True
        return await self._client.commit(
            self.reservation_id,
            usage,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            exclude_cached=self._exclude_cached,
        )

    async def release(self) -> pb.ReleaseResponse:
        """Release now (the exit then settles nothing)."""
        self._outcome.settled = True
        return await self._client.release(self.reservation_id)

    async def __aenter__(self) -> AsyncReservation:
        give_up_at = time.monotonic() + self._max_wait_s
        while True:
            response: pb.CheckAndReserveResponse = await self._client._call(
                self._client._stub.CheckAndReserve, self._request
            )
            if response.decision == pb.DECISION_ALLOWED:
                self.response = response
                return self
            # A denial writes nothing, so asking again with the same idempotency key is safe.
            await asyncio.sleep(wait_before_retrying(response, give_up_at - time.monotonic()))

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._outcome.settled:
            return
        if exc is None:
            await self.commit(self._outcome.commit_usage(self.response.reserved))
            return
        # The body failed. What it recorded was spent (the LLM answered, then something broke):
        # commit it. Nothing recorded: the call did not happen, give the reservation back.
        try:
            if self._outcome.recorded:
                await self.commit(self._outcome.commit_usage(self.response.reserved))
            else:
                await self.release()
        except Exception as settle_error:  # the body's exception matters more; the lease frees the slot
            action = "committing" if self._outcome.recorded else "releasing"
            exc.add_note(f"quotad: {action} reservation {self.reservation_id} failed: {settle_error}")
