"""The exceptions the decision core and the store raise.

The gRPC layer maps each one to a status code (see api.py); nothing below the
gRPC layer knows about status codes.

Each error also has a stable `reason` (AIP-193: UPPER_SNAKE_CASE, never renamed), which the gRPC
layer sends in a google.rpc.ErrorInfo, and the errors worth retrying a `retry_delay_ms`, sent
in a google.rpc.RetryInfo.

    QuotadError
    +-- InvalidRequest       bad input, with one violation per field  -> INVALID_ARGUMENT
    +-- NotFound             an unknown reservation                   -> NOT_FOUND
    +-- FailedPrecondition   the state forbids it                      -> FAILED_PRECONDITION
    |   +-- AlreadySettled         Commit after Release, or the reverse
    |   +-- IdempotencyKeyReused   the key was first used for another request
    +-- StoreUnavailable     Redis unreachable, slow or gave up        -> UNAVAILABLE
    +-- NotReady             still starting (tokenizers loading)       -> UNAVAILABLE
    +-- DeadlineExceeded     the caller's own deadline came first      -> DEADLINE_EXCEEDED
    +-- Unauthenticated      no identity where the policy needs one    -> UNAUTHENTICATED
    +-- PermissionDenied     the caller may not do this                -> PERMISSION_DENIED
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its name in the request and what is wrong with it."""

    field: str
    description: str


class QuotadError(Exception):
    """Base of every error quotad raises on purpose."""

    reason: ClassVar[str] = "INTERNAL"
    # How long a caller should wait before it tries again; None: retrying the same call will not help.
    retry_delay_ms: ClassVar[int | None] = None


class InvalidRequest(QuotadError):
    """The request is malformed or names something the policy does not have.

    The message names the first few violations only (a request can have as many as it has
    items); `message` replaces it when no field can be named, e.g. for an undecodable body.
    """

    reason = "INVALID_REQUEST"

    MESSAGE_VIOLATIONS = 20

    def __init__(self, violations: list[FieldViolation], message: str = "") -> None:
        self.violations = tuple(violations)
        if not message:
            shown = self.violations[: self.MESSAGE_VIOLATIONS]
            message = "; ".join(f"{v.field}: {v.description}" for v in shown)
            if len(self.violations) > len(shown):
                message += f"; and {len(self.violations) - len(shown)} more"
        super().__init__(message)


class NotFound(QuotadError):
    """The thing asked for does not exist (or no longer does)."""

    reason = "RESERVATION_NOT_FOUND"


class FailedPrecondition(QuotadError):
    """The request is well-formed but the state forbids it."""

    reason = "FAILED_PRECONDITION"


class AlreadySettled(FailedPrecondition):
    """Commit after Release, or Release after Commit: the reservation was settled the other way."""

    reason = "RESERVATION_ALREADY_SETTLED"


class IdempotencyKeyReused(FailedPrecondition):
    """The idempotency key was first used for a different request."""

    reason = "IDEMPOTENCY_KEY_REUSED"


class StoreUnavailable(QuotadError):
    """The store did not answer in time or at all; nothing is known to have changed."""

    reason = "STORE_UNAVAILABLE"
    # quotad re-checks an unhealthy Redis every 100 ms (health), so it is back within about that.
    retry_delay_ms = 100


class NotReady(QuotadError):
    """The service is still starting (e.g. loading tokenizers); retry shortly."""

    reason = "NOT_READY"
    # Loading the tokenizers takes seconds, once, at start.
    retry_delay_ms = 1000


class DeadlineExceeded(QuotadError):
    """The caller's own deadline passed before a decision was made; nothing was reserved."""

    reason = "DEADLINE_EXCEEDED"


class Unauthenticated(QuotadError):
    """The policy names its callers and this call has no identity, or a bad token."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(QuotadError):
    """The caller may not do this: the method, the tenant or the tier is not its to use."""

    reason = "PERMISSION_DENIED"
