"""What the asyncio and the blocking client share: settings, request building, retry and wait rules.

Nothing here does I/O, so both clients make the same requests and the same decisions.
"""

from __future__ import annotations

import copy
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from quotad.errors import QuotaDenied, QuotadError, from_rpc_error
from quotad.usage import Tally, Usage
from quotad.v1 import quota_pb2 as pb

Metadata = Sequence[tuple[str, str]]
MetadataProvider = Callable[[], Iterable[tuple[str, str]]]
"""Called before every RPC; returns metadata to send with it (e.g. a fresh bearer token)."""
RequestT = TypeVar("RequestT", bound=Message)

# One call's deadline, all of its attempts and the sleeps between them included. quotad answers
# UNAVAILABLE within its Redis timeout (QUOTAD_REDIS_TIMEOUT_MS, 250 ms by default), so 2 s
# rides out a Redis hiccup of about a second (five or more attempts) and still fails fast
# enough for a caller that then fails open or closed.
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_RETRY_BACKOFF_S = 0.05  # the first retry's backoff; it doubles for each next one ...
MAX_RETRY_BACKOFF_S = 1.0  # ... up to this
_JITTER = (0.5, 1.0)  # each sleep is the backoff times a random factor in this range


@dataclass(frozen=True, slots=True)
class Settings:
    """How a client talks to quotad (see QuotaClient for the meaning of each)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    metadata: Metadata = ()
    metadata_provider: MetadataProvider | None = None
    retries: int | None = None
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"retries must be 0 or more (or None: until the deadline), got {self.retries}")
        if self.retry_backoff_s <= 0:
            raise ValueError(f"retry_backoff must be positive, got {self.retry_backoff_s}")

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        extra = tuple(self.metadata_provider()) if self.metadata_provider is not None else ()
        return (*self.metadata, *extra)

    def attempts(self, request: Message | None = None) -> Attempts:
        """The attempts of one logical call of `request`, starting now.

        A CheckAndReserve with a server wait (`max_wait`) may be held that long in quotad's line,
        so its deadline is longer by as much: `timeout_s` is left for the answer.
        """
        wait_s = server_wait_s(request)
        return Attempts(self, self.timeout_s + wait_s, wait_s=wait_s)


class Attempts:
    """The attempts of one logical call: one deadline for all of them, and the sleep before each retry.

    Each attempt gets what is left of the deadline as its own gRPC timeout, so the caller's
    `timeout` bounds the whole call, retries included. A server wait (`wait_s`, in the budget)
    ends at the same time however many attempts it takes: a retry asks for what is left of it.
    """

    def __init__(
        self,
        settings: Settings,
        budget_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        wait_s: float = 0.0,
    ) -> None:
        self._clock = clock
        started = clock()
        self._deadline = started + budget_s
        self._wait_s = wait_s
        self._wait_ends = started + wait_s
        self._retries_left = settings.retries
        self._backoff_s = settings.retry_backoff_s
        self.made = 0

    def attempt(self, request: RequestT) -> tuple[RequestT, float]:
        """The request the attempt about to be made sends, and its gRPC timeout (counted as made).

        The call's request, except that a retried CheckAndReserve with a server wait asks only
        for what is left of the wait, so that its answer still comes before the deadline (with
        the same idempotency key: the same reservation, if an earlier attempt made one).
        """
        if self.made > 0 and self._wait_s > 0 and isinstance(request, pb.CheckAndReserveRequest):
            retry = copy.deepcopy(request)
            left_s = min(self._wait_s, max(self._wait_ends - self._clock(), 0.0))
            retry.max_wait.FromMicroseconds(int(left_s * 1_000_000))
            request = retry
        return request, self.timeout()

    def timeout(self) -> float:
        """The gRPC timeout of the attempt about to be made (counted as made)."""
        self.made += 1
        return max(self._deadline - self._clock(), 0.0)

    def delay_before_retry(self, code: grpc.StatusCode | None) -> float | None:
        """Seconds to sleep before trying again, or None: give up and raise this attempt's error.

        Gives up on any code but UNAVAILABLE, when the retries are spent, or when the sleep
        would reach the deadline (the next attempt would have no time left).
        """
        if not is_retryable(code) or self._retries_left == 0:
            return None
        delay = self._backoff_s * random.uniform(*_JITTER)
        if self._clock() + delay >= self._deadline:
            return None
        self._backoff_s = min(self._backoff_s * 2, MAX_RETRY_BACKOFF_S)
        if self._retries_left is not None:
            self._retries_left -= 1
        return delay

    def failure(self, error: grpc.RpcError) -> QuotadError:
        """The QuotadError to raise for the last attempt's error, saying how many were made."""
        failure = from_rpc_error(error)
        if self.made > 1:
            failure.add_note(f"quotad: {self.made} attempts, the same request each time")
        return failure


def is_retryable(code: grpc.StatusCode | None) -> bool:
    """UNAVAILABLE only: quotad, or its Redis, did not decide, or its answer was lost.

    Every call the clients retry is idempotent on the server: CheckAndReserve always
    carries an idempotency key (one is generated per logical call when the caller gives
    none, and every attempt sends the same one), Commit and Release return the first result
    when repeated, and GetUsage changes nothing. So a retry after an answer that was lost,
    or after a Redis connection that dropped once the script was sent, never reserves or
    settles twice. DEADLINE_EXCEEDED is not retried: the caller's deadline has passed.
    """
    return code == grpc.StatusCode.UNAVAILABLE


def server_wait_s(request: Message | None) -> float:
    """How long quotad may hold `request` in its waiting line: a CheckAndReserve's max_wait, or 0."""
    if isinstance(request, pb.CheckAndReserveRequest) and request.HasField("max_wait"):
        return max(request.max_wait.ToTimedelta().total_seconds(), 0.0)
    return 0.0


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
                cache_write_input_tokens=read.cache_write_input_tokens,
            )
        # The server prices cache reads at the cached rate and leaves them out of the limits
        # the policy marks exclude_cached.
        return pb.CommitRequest(
            reservation_id=reservation_id,
            input_tokens=read.input_tokens,
            output_tokens=read.output_tokens,
            cached_input_tokens=read.cached_input_tokens,
            cache_write_input_tokens=read.cache_write_input_tokens,
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
    """What a reservation's body recorded, settled on exit (the same rule for `reserve()` and Celery).

    Committed when anything was recorded, even if the body then raised: the LLM call happened
    and its tokens were spent. Released only when nothing was recorded and the body raised.
    """

    tally: Tally | None = None
    settled: bool = False

    @property
    def recorded(self) -> bool:
        return self.tally is not None

    def record(self, usage: object | None, input_tokens: int | None, output_tokens: int | None) -> None:
        """Add a report to what the body recorded; see `reserve()`'s `record` for what it takes."""
        if usage is not None:
            if input_tokens is not None or output_tokens is not None:
                raise TypeError("pass either a usage object or input_tokens/output_tokens, not both")
            found = Tally.of(usage)  # raises now, in the caller's code, if it cannot be read
            if found is not None:
                self.tally = found if self.tally is None else self.tally.then(found)
            return
        if input_tokens is None and output_tokens is None:
            return  # e.g. `record(chunk.usage)` for a chunk that has none: it says nothing
        if input_tokens is None or output_tokens is None:
            raise TypeError("record needs a usage object, or both input_tokens and output_tokens")
        self.tally = Tally(input_tokens, 0, 0, output_tokens, whole=True)

    def commit_usage(self, reserved: pb.Cost) -> Usage:
        """What to commit: what was recorded, the reserved estimate standing in for what was not."""
        tally = self.tally if self.tally is not None else Tally()
        return tally.usage_or(input_tokens=reserved.input_tokens, output_tokens=reserved.output_tokens)
