"""Plain types shared by the policy, the decision core and the store.

No grpc and no redis here: these are the words the core speaks.
Times are integer microseconds; token and request counts are integers.

The types built for every decision (Cost, LimitStatus, ReserveOutcome, and the
store's ReservePlan and ReserveResult) are slotted but not frozen: a frozen
dataclass sets each field through object.__setattr__, which made building them
a fifth of the server's own Python work per decision. Treat them as values all
the same: derive new ones with dataclasses.replace, never assign to a field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum


class Metric(StrEnum):
    """What a limit counts."""

    REQUESTS = "requests"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    TOTAL_TOKENS = "total_tokens"
    CONCURRENT = "concurrent"
    COST_USD = "cost_usd"  # counted in micro-dollars


class Algorithm(StrEnum):
    """How a limit replenishes."""

    TOKEN_BUCKET = "token_bucket"
    SLIDING_WINDOW = "sliding_window"
    CONCURRENCY = "concurrency"
    CALENDAR = "calendar"  # a budget that resets at UTC midnight or on the first of the month


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
    BUDGET_EXHAUSTED = "budget_exhausted"  # a calendar budget, until it resets
    QUEUE_FULL = "queue_full"  # asked to wait, but the waiting line is full


class Priority(StrEnum):
    """How much of a shared limit a request may use: background work yields to paid users."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


class Calendar(StrEnum):
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of the policy.

    `period_us` is 0 for concurrency and calendar limits (`calendar` says which
    calendar period). `admission` caps, per priority, the share of a shared (tenant
    or global) limit that requests may fill, keeping headroom for higher priorities. `model` restricts the limit to requests for that model;
    None applies it to every model. `exclude_cached` leaves prompt-cache reads
    out of an input or total token limit (as Anthropic's ITPM does). Cost limits
    count micro-dollars. A `slices` limit is held in escrow: one slice per partition, see
    docs/design.md. A `shadow` limit is evaluated on every request but never denies one:
    what it would have denied is reported (LimitStatus.denied, a metric, a log line) and
    is not charged to it, so its counter shows what enforcing it would have let through.
    """

    name: str
    scope: Scope
    metric: Metric
    algorithm: Algorithm
    limit: int
    period_us: int
    model: str | None = None
    calendar: Calendar | None = None
    exclude_cached: bool = False
    admission: tuple[tuple[Priority, float], ...] = ()
    shadow: bool = False  # evaluated and counted, never denies (see reserve.lua's limit modes)
    # A global limit (or a limit of a tenant in escrow.tenants) split into this many slices, one
    # per partition (escrow, see docs/design.md); 0: one counter.
    slices: int = 0
    # Limits key per-limit caches on the hot path; hashing all fields each time costs more than the lookup.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self._values()))

    def _values(self) -> tuple[object, ...]:
        """The fields __init__ takes, in order: everything but the cached hash."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.init)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Limit], tuple[object, ...]]:
        # Pickles and copies are rebuilt through __init__: the cached hash is of this
        # process's string hashes and must never travel to another process.
        return Limit, self._values()

    def applies_to(self, model: str) -> bool:
        return self.model is None or self.model == model

    def admit_limit(self, priority: Priority) -> int:
        """The share of the limit a request of `priority` may fill (all of it without ceilings)."""
        for level, fraction in self.admission:
            if level is priority:
                return int(self.limit * fraction)
        return self.limit


@dataclass(slots=True)
class Cost:
    """An amount charged to limits: one request's estimate or actual usage.

    `input_tokens` includes `cached_input_tokens` (prompt-cache reads, priced lower) and
    `cache_write_input_tokens` (prompt-cache writes, priced at their own rate).
    """

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cost_micro_usd: int = 0
    cache_write_input_tokens: int = 0


class ServiceTier(StrEnum):
    """How the provider is asked to process a call: it selects the price."""

    STANDARD = "standard"
    BATCH = "batch"
    FLEX = "flex"
    PRIORITY = "priority"


class OutputSource(StrEnum):
    """Where a reservation's output tokens came from."""

    REQUESTED = "requested"  # the request's max_output_tokens
    LEARNED = "learned"  # the learned quantile
    MODEL_MAXIMUM = "model_maximum"  # the model's maximum output (or what its window leaves)


MICROS_PER_MILLION_TOKENS = 1_000_000


def round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator to the nearest integer, ties to even (banker's rounding)."""
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2):
        quotient += 1
    return quotient


@dataclass(frozen=True, slots=True)
class Price:
    """A model's prices in micro-dollars per million tokens ($2.50/M is 2_500_000).

    `cache_write` is the rate of prompt-cache writes (None: the input rate). A call whose
    input is above `threshold` tokens pays the `above` prices on every token, as Gemini and
    Anthropic's long-context prices work (threshold 0: one set of prices).
    """

    input: int
    cached_input: int
    output: int
    cache_write: int | None = None
    threshold: int = 0
    above: Price | None = None

    def at(self, input_tokens: int) -> Price:
        """The prices a call with `input_tokens` of input pays."""
        if self.above is not None and self.threshold and input_tokens > self.threshold:
            return self.above
        return self

    @property
    def write_rate(self) -> int:
        return self.input if self.cache_write is None else self.cache_write

    def cost_micro_usd(
        self, input_tokens: int, cached_input_tokens: int, output_tokens: int, cache_write_tokens: int = 0
    ) -> int:
        """The cost in whole micro-dollars, rounded half to even once for the whole call.

        Half-even: each call is off by at most half a micro-dollar, and the roundings of
        calls whose exact costs are spread out cancel in sum instead of all going up.
        settle.lua computes the same integer with the same formula.
        """
        rates = self.at(input_tokens)
        numerator = (
            (input_tokens - cached_input_tokens - cache_write_tokens) * rates.input
            + cached_input_tokens * rates.cached_input
            + cache_write_tokens * rates.write_rate
            + output_tokens * rates.output
        )
        return round_half_even(numerator, MICROS_PER_MILLION_TOKENS)

    def script_arg(self) -> str:
        """The prices as settle.lua reads them from the reservation record: "<input> <cached> <output>
        [<cache write> <threshold> [<input> <cached> <output> <cache write>]]"; the short form, which
        settle.lua read before issue 16, when there is neither a cache-write price nor a threshold."""
        if self.write_rate == self.input and not (self.above is not None and self.threshold):
            return f"{self.input} {self.cached_input} {self.output}"
        rates = [
            self.input,
            self.cached_input,
            self.output,
            self.write_rate,
            self.threshold if self.above else 0,
        ]
        if self.above is not None and self.threshold:
            above = self.above
            rates += [above.input, above.cached_input, above.output, above.write_rate]
        return " ".join(str(rate) for rate in rates)


@dataclass(slots=True)
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

    @property
    def shadow_denied(self) -> bool:
        """A shadow limit that would have denied this request (it was not charged to it)."""
        return self.limit.shadow and self.wait_us != 0


@dataclass(slots=True)
class ReserveOutcome:
    """The answer to CheckAndReserve."""

    decision: Decision
    tenant: str
    tier: str
    limits: tuple[LimitStatus, ...]
    reservation_id: str = ""
    lease_expires_at_us: int = 0
    reserved: Cost | None = None
    counted_input_tokens: int = 0
    deny_reason: DenyReason | None = None
    retry_after_us: int | None = None
    binding_limit: str | None = None
    replayed: bool = False
    priority: Priority = Priority.NORMAL
    waited_us: int = 0
    output_source: OutputSource = OutputSource.REQUESTED


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    """The answer to Commit (committed is the actual usage) or Release (committed is zero).

    `model` and `tier` are those the reservation was made for.
    """

    reserved: Cost
    committed: Cost
    repeat: bool
    lease_expired: bool
    model: str = ""
    tier: str = ""
    max_output_tokens: int | None = None  # as requested (0: none); None for records from before it was kept

    @property
    def impossible_usage(self) -> bool:
        """More output reported than the call was allowed: no provider returns that."""
        bound = self.max_output_tokens
        return bool(bound) and self.committed.output_tokens > (bound or 0)


@dataclass(frozen=True, slots=True)
class UsageReport:
    """The answer to GetUsage."""

    tenant: str
    tier: str
    limits: tuple[LimitStatus, ...]


@dataclass(frozen=True, slots=True)
class AccuracyReport:
    """How far estimates were from actual usage, over a decaying window of recent Commits.

    Ratios are actual/estimate as (median, p95); `learned_output_tokens` is the output
    reservation learned for the model (None while samples are too few or not learning).
    """

    model: str
    tier: str
    commits: int
    input_ratio: tuple[float, float]
    output_ratio: tuple[float, float]
    estimated_tokens: int
    actual_tokens: int
    refunded_tokens: int
    overrun_tokens: int
    learning: bool
    learned_output_tokens: int | None
    input_overrun_tokens: int = 0
    output_overrun_tokens: int = 0
    input_overrun_commits: int = 0
    output_overrun_commits: int = 0
    unreserved_output_commits: int = 0


class Method(StrEnum):
    """What a caller may do, as the policy's `callers.<identity>.methods` names it."""

    RESERVE = "reserve"  # CheckAndReserve, its batch and stream
    SETTLE = "settle"  # Commit and Release, their batch and stream
    READ = "read"  # GetUsage
    ACCURACY = "accuracy"  # GetAccuracy


@dataclass(frozen=True, slots=True)
class TenantGrant:
    """How a caller may act for one tenant: the tier fixed, chosen from a list, or as requested."""

    tier: str | None = None  # this tier, whatever the request says (another one is refused)
    tiers: tuple[str, ...] = ()  # one of these, the first when the request names none


@dataclass(frozen=True, slots=True)
class CallerRule:
    """One entry of the policy's `callers`: identities matching `pattern` (`*` matches anything),
    the tenants they may act for (`*`: any), and what they may do."""

    pattern: str
    tenants: Mapping[str, TenantGrant]
    methods: frozenset[Method]
    default_tenant: str  # the first tenant named (the policy's default tenant if that is `*`)
