"""What the asyncio and the blocking client share: settings, request building, retry and wait rules.

Nothing here does I/O, so both clients make the same requests and the same decisions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.protobuf import duration_pb2

from quotad.errors import QuotaDenied
from quotad.usage import Usage
from quotad.v1 import quota_pb2 as pb

Metadata = Sequence[tuple[str, str]]
MetadataProvider = Callable[[], Iterable[tuple[str, str]]]
"""Called before every RPC; returns metadata to send with it (e.g. a fresh bearer token)."""

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_RETRIES = 2
DEFAULT_RETRY_BACKOFF_S = 0.05


@dataclass(frozen=True, slots=True)
class Settings:
    """How a client talks to quotad (see QuotaClient for the meaning of each)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    metadata: Metadata = ()
    metadata_provider: MetadataProvider | None = None
    retries: int = DEFAULT_RETRIES
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, got {self.retries}")

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        extra = tuple(self.metadata_provider()) if self.metadata_provider is not None else ()
        return (*self.metadata, *extra)

    def retry_delays(self) -> list[float]:
        """Sleep before each retry: exponential from retry_backoff_s."""
        return [self.retry_backoff_s * 2**attempt for attempt in range(self.retries)]


def is_retryable(code: grpc.StatusCode | None) -> bool:
    """UNAVAILABLE only: nothing was decided, or the request is safe to repeat.

    Every call the clients retry is idempotent on the server: CheckAndReserve always
    carries an idempotency key (one is generated when the caller gives none), Commit and
    Release return the first result when repeated, and GetUsage changes nothing. So a
    retry after a lost answer never reserves or settles twice.
    """
    return code == grpc.StatusCode.UNAVAILABLE


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def reserve_request(
    subject: str,
    *,
    tenant: str,
    tier: str,
    model: str,
    input_tokens: int,
    max_output_tokens: int,
    lease: timedelta | None,
    idempotency_key: str,
    priority: pb.Priority.ValueType = pb.PRIORITY_UNSPECIFIED,
    server_wait: timedelta | None = None,
) -> pb.CheckAndReserveRequest:
    request = pb.CheckAndReserveRequest(
        subject=subject,
        tenant=tenant,
        tier=tier,
        model=model,
        input_tokens=input_tokens,
        max_output_tokens=max_output_tokens,
        idempotency_key=idempotency_key,
        priority=priority,
    )
    if lease is not None:
        duration = duration_pb2.Duration()
        duration.FromTimedelta(lease)
        request.lease.CopyFrom(duration)
    if server_wait is not None:
        request.max_wait.FromTimedelta(server_wait)
    return request


def commit_request(
    reservation_id: str,
    usage: object | None,
    *,
    input_tokens: int | None,
    output_tokens: int | None,
    exclude_cached: bool,
) -> pb.CommitRequest:
    """A Commit from a provider usage object, or from plain numbers (not both)."""
    if usage is not None:
        if input_tokens is not None or output_tokens is not None:
            raise TypeError("pass either a usage object or input_tokens/output_tokens, not both")
        read = Usage.of(usage)
        if exclude_cached:  # leave cache reads out of every limit, whatever the policy says
            return pb.CommitRequest(
                reservation_id=reservation_id,
                input_tokens=read.charged_input(exclude_cached=True),
                output_tokens=read.output_tokens,
            )
        # The server prices cache reads at the cached rate and leaves them out of the limits
        # the policy marks exclude_cached.
        return pb.CommitRequest(
            reservation_id=reservation_id,
            input_tokens=read.input_tokens,
            output_tokens=read.output_tokens,
            cached_input_tokens=read.cached_input_tokens,
        )
    if input_tokens is None or output_tokens is None:
        raise TypeError("commit needs a usage object, or both input_tokens and output_tokens")
    return pb.CommitRequest(
        reservation_id=reservation_id, input_tokens=input_tokens, output_tokens=output_tokens
    )


def wait_before_retrying(response: pb.CheckAndReserveResponse, budget_s: float) -> float:
    """Seconds to sleep before asking again, within what is left of max_wait; else raise QuotaDenied.

    Any denial with a retry_after can be waited out (a limit, a calendar budget, a full line);
    EXCEEDS_CAPACITY never fits and has none.
    """
    if response.deny_reason != pb.DENY_REASON_EXCEEDS_CAPACITY and response.HasField("retry_after"):
        wait_s = max(response.retry_after.ToTimedelta().total_seconds(), 0.001)
        if wait_s <= budget_s:
            return wait_s
    raise QuotaDenied(response)


@dataclass(slots=True)
class Outcome:
    """What a reservation's context manager settles with on a clean exit."""

    usage: object | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    settled: bool = False

    def record(self, usage: object | None, input_tokens: int | None, output_tokens: int | None) -> None:
        if usage is not None:
            Usage.of(usage)  # fail now, in the caller's code, if it cannot be read
        self.usage, self.input_tokens, self.output_tokens = usage, input_tokens, output_tokens

    def commit_fields(self, reserved: pb.Cost) -> tuple[object | None, int | None, int | None]:
        """Usage recorded by the body, or the reserved estimate when it recorded none."""
        if self.usage is None and self.input_tokens is None and self.output_tokens is None:
            return None, reserved.input_tokens, reserved.output_tokens
        return self.usage, self.input_tokens, self.output_tokens
