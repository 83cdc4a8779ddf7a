"""Plain types shared by the policy, the decision core and the store.

No grpc and no redis here: these are the words the core speaks.
Times are integer microseconds; token and request counts are integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Metric(StrEnum):
    """What a limit counts."""

    REQUESTS = "requests"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    TOTAL_TOKENS = "total_tokens"
    CONCURRENT = "concurrent"


class Algorithm(StrEnum):
    """How a limit replenishes."""

    TOKEN_BUCKET = "token_bucket"
    SLIDING_WINDOW = "sliding_window"
    CONCURRENCY = "concurrency"


class Scope(StrEnum):
    """Whose counter a limit keeps."""

    SUBJECT = "subject"
    TENANT = "tenant"
    GLOBAL = "global"


class Decision(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


class DenyReason(StrEnum):
    LIMIT_EXCEEDED = "limit_exceeded"
    EXCEEDS_CAPACITY = "exceeds_capacity"


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of the policy.

    `period_us` is 0 for concurrency limits. `model` restricts the limit to
    requests for that model; None applies it to every model.
    """

    name: str
    scope: Scope
    metric: Metric
    algorithm: Algorithm
    limit: int
    period_us: int
    model: str | None = None

    def applies_to(self, model: str) -> bool:
        return self.model is None or self.model == model


@dataclass(frozen=True, slots=True)
class Cost:
    """An amount charged to limits: one request's estimate or actual usage."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as one request saw it.

    `remaining` is after the reservation when allowed, before it when denied,
    and negative when usage above estimates left debt. `wait_us` is the time
    until this request's cost fits the limit: 0 when it fits now, None when it
    never can.
    """

    limit: Limit
    remaining: int
    reset_after_us: int
    wait_us: int | None
    binding: bool = False

    @property
    def denied(self) -> bool:
        return self.wait_us != 0


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    """The answer to CheckAndReserve."""

    decision: Decision
    tenant: str
    tier: str
    limits: tuple[LimitStatus, ...]
    reservation_id: str = ""
    lease_expires_at_us: int = 0
    reserved: Cost | None = None
    deny_reason: DenyReason | None = None
    retry_after_us: int | None = None
    binding_limit: str | None = None
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    """The answer to Commit (committed is the actual usage) or Release (committed is zero)."""

    reserved: Cost
    committed: Cost
    repeat: bool
    lease_expired: bool


@dataclass(frozen=True, slots=True)
class UsageReport:
    """The answer to GetUsage."""

    tenant: str
    tier: str
    limits: tuple[LimitStatus, ...]
