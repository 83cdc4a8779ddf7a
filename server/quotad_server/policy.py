"""Load and validate the policy file.

The policy says which limits apply to a request: the limits of its tier (one
counter per subject), of its tenant (one counter per tenant) and the global
ones (one counter for everybody, optionally only for one model). A bad file is
refused with a message naming the file, the field path and the bad value.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tiktoken.model import MODEL_PREFIX_TO_ENCODING, MODEL_TO_ENCODING

from quotad_server.model import (
    Algorithm,
    Calendar,
    CallerRule,
    Limit,
    Method,
    Metric,
    Price,
    Priority,
    Scope,
    ServiceTier,
    TenantGrant,
)

MAX_LIMIT = 10**15
MAX_PRICE_USD = 1000  # per million tokens: keeps exact integer cost arithmetic in Lua (< 2^53)
CALENDARS = ("day", "month")
WILDCARD_TENANT = "*"
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_US = {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class PolicyError(ValueError):
    """The policy file cannot be used; the message says where and why."""


def parse_duration_us(text: str) -> int:
    """Parse '500ms', '30s', '1m', '1h', '1d' into microseconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"invalid duration {text!r}: expected a whole number with ms, s, m, h or d")
    return int(match.group(1)) * _UNIT_US[match.group(2)]


Duration = Annotated[str, Field(description="e.g. 500ms, 30s, 1m, 1h, 1d")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _micro_usd(value: float | int, what: str) -> int:
    """Dollars (as written in the policy) to whole micro-dollars, refusing sub-micro precision."""
    micros = Decimal(str(value)) * 1_000_000
    if micros != micros.to_integral_value():
        raise ValueError(f"{what} {value!r} has more than 6 decimal places")
    return int(micros)


class AdmissionSpec(_Strict):
    """Per priority, the share of a shared limit its requests may fill (0 < share <= 1)."""

    low: float | int = Field(default=1.0, gt=0, le=1)
    normal: float | int = Field(default=1.0, gt=0, le=1)
    high: float | int = Field(default=1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> AdmissionSpec:
        if not self.low <= self.normal <= self.high:
            raise ValueError(f"need low <= normal <= high, got {self.low}, {self.normal}, {self.high}")
        return self

    def shares(self) -> tuple[tuple[Priority, float], ...]:
        return (
            (Priority.LOW, float(self.low)),
            (Priority.NORMAL, float(self.normal)),
            (Priority.HIGH, float(self.high)),
        )


class LimitSpec(_Strict):
    name: str
    metric: Metric
    limit: int | float = Field(gt=0, le=MAX_LIMIT)
    period: Duration | None = None
    algorithm: Literal["token_bucket", "sliding_window"] | None = None
    model: str | None = None
    exclude_cached: bool = False
    admission: AdmissionSpec | None = None
    shadow: bool = False  # evaluated and counted, never denies: to roll a new limit out safely

    @field_validator("metric", mode="before")
    @classmethod
    def _metric(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in Metric.__members__.values():
            raise ValueError(f"unknown metric {value!r}: expected one of {', '.join(Metric)}")
        return Metric(value) if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"invalid limit name {value!r}: letters, digits, '_', '-', '.'; at most 128")
        return value

    @field_validator("period")
    @classmethod
    def _period(cls, value: str | None) -> str | None:
        if value is not None and value not in CALENDARS and parse_duration_us(value) <= 0:
            raise ValueError(f"period must be positive, got {value!r}")
        return value

    @model_validator(mode="after")
    def _shape(self) -> LimitSpec:
        if self.metric is Metric.CONCURRENT:
            if self.period is not None or self.algorithm is not None:
                raise ValueError("a concurrent limit takes neither period nor algorithm")
        elif self.period is None:
            raise ValueError(f"a {self.metric} limit needs a period (e.g. 1m, or day / month)")
        elif self.period in CALENDARS and self.algorithm is not None:
            raise ValueError(f"a {self.period} budget resets on the calendar; it takes no algorithm")
        if isinstance(self.limit, float) and self.metric is not Metric.COST_USD:
            raise ValueError(f"a {self.metric} limit is a whole number, got {self.limit}")
        if self.metric is Metric.COST_USD:
            _micro_usd(self.limit, "limit")
        if self.exclude_cached and self.metric not in (Metric.INPUT_TOKENS, Metric.TOTAL_TOKENS):
            raise ValueError("exclude_cached applies to input_tokens and total_tokens limits only")
        return self

    def to_limit(self, scope: Scope, default_admission: AdmissionSpec | None = None) -> Limit:
        calendar = None
        if self.metric is Metric.CONCURRENT:
            algorithm, period_us = Algorithm.CONCURRENCY, 0
        elif self.period in CALENDARS:
            algorithm, period_us, calendar = Algorithm.CALENDAR, 0, Calendar(self.period)
        else:
            assert self.period is not None  # guaranteed by _shape
            algorithm = Algorithm(self.algorithm or Algorithm.TOKEN_BUCKET)
            period_us = parse_duration_us(self.period)
        limit = _micro_usd(self.limit, "limit") if self.metric is Metric.COST_USD else int(self.limit)
        admission = self.admission or (default_admission if scope is not Scope.SUBJECT else None)
        return Limit(
            self.name,
            scope,
            self.metric,
            algorithm,
            limit,
            period_us,
            self.model,
            calendar,
            self.exclude_cached,
            admission.shares() if admission else (),
            self.shadow,
        )


class LimitGroup(_Strict):
    limits: list[LimitSpec] = Field(default_factory=list)

    @field_validator("limits")
    @classmethod
    def _unique(cls, value: list[LimitSpec]) -> list[LimitSpec]:
        seen: set[str] = set()
        for spec in value:
            if spec.name in seen:
                raise ValueError(f"duplicate limit name {spec.name!r}")
            seen.add(spec.name)
        return value


class TierGroup(LimitGroup):
    priority: Literal["low", "normal", "high"] = "normal"

    @field_validator("limits")
    @classmethod
    def _subject_limits(cls, value: list[LimitSpec]) -> list[LimitSpec]:
        for spec in value:
            if spec.admission is not None:
                raise ValueError(
                    f"limit {spec.name!r}: admission ceilings apply to tenant and global limits only"
                )
        return value


class Defaults(_Strict):
    tenant: str = "default"
    tier: str


class Leases(_Strict):
    default: Duration = "60s"
    min: Duration = "1s"
    max: Duration = "15m"

    @model_validator(mode="after")
    def _ordered(self) -> Leases:
        low, default, high = (parse_duration_us(v) for v in (self.min, self.default, self.max))
        if not 0 < low <= default <= high:
            raise ValueError(f"need 0 < min <= default <= max, got {self.min}, {self.default}, {self.max}")
        return self


class RatesSpec(_Strict):
    """US dollars per million tokens: cache reads at `cached_input` (default: input), cache
    writes at `cache_write` (default: input; Anthropic's 5-minute writes are 1.25x input)."""

    input: float | int = Field(ge=0, le=MAX_PRICE_USD)
    output: float | int = Field(ge=0, le=MAX_PRICE_USD)
    cached_input: float | int | None = Field(default=None, ge=0, le=MAX_PRICE_USD)
    cache_write: float | int | None = Field(default=None, ge=0, le=MAX_PRICE_USD)

    @model_validator(mode="after")
    def _precision(self) -> RatesSpec:
        for what in ("input", "output", "cached_input", "cache_write"):
            value = getattr(self, what)
            if value is not None:
                _micro_usd(value, what)
        return self

    def to_price(self) -> Price:
        cached = self.input if self.cached_input is None else self.cached_input
        return Price(
            _micro_usd(self.input, "input"),
            _micro_usd(cached, "cached_input"),
            _micro_usd(self.output, "output"),
            None if self.cache_write is None else _micro_usd(self.cache_write, "cache_write"),
        )


class AbovePriceSpec(RatesSpec):
    """The prices of every token of a call whose input is above `threshold` tokens."""

    threshold: int = Field(gt=0, le=10**9)


class PriceSpec(RatesSpec):
    """US dollars per million tokens, and optionally other prices above a context threshold."""

    above: AbovePriceSpec | None = None

    def to_price(self) -> Price:
        base = RatesSpec.to_price(self)
        if self.above is None:
            return base
        above = RatesSpec.to_price(self.above)
        return Price(
            base.input, base.cached_input, base.output, base.cache_write, self.above.threshold, above
        )


class WaitingSpec(_Strict):
    """Server-side waiting lines (CheckAndReserve with max_wait)."""

    max_wait: Duration = "30s"  # the longest max_wait a caller may ask for
    max_line: int = Field(default=1000, ge=1, le=1_000_000)  # places per limit's line
    aging: Duration = "30s"  # a waiter ranks with new arrivals one priority up after this long
    heartbeat: Duration = "1s"  # waiters re-check at least this often; a silent one's place expires after 3

    @model_validator(mode="after")
    def _positive(self) -> WaitingSpec:
        for name in ("max_wait", "aging", "heartbeat"):
            if parse_duration_us(getattr(self, name)) <= 0:
                raise ValueError(f"waiting.{name} must be positive")
        return self


class EscrowSpec(_Strict):
    """Global limits held in escrow: tenants hash into `partitions` partitions, and each global
    limit is split into one slice per partition, rebalanced by demand (see docs/design.md).
    The tenants named in `tenants` (large ones) spread too: their subjects hash into the
    partitions, and each of their tenant limits is split into slices like a global limit."""

    partitions: int = Field(default=16, ge=2, le=1024)
    tenants: list[str] = Field(default_factory=list)
    floor: float | int = Field(default=0.01, ge=0, le=1)  # of its even share, what an idle slice keeps
    rebalance_interval: Duration = "100ms"  # the least time between two pulls of one slice by a replica
    transfer_timeout: Duration = "5s"  # capacity in flight this long goes back to its giver

    @model_validator(mode="after")
    def _positive(self) -> EscrowSpec:
        for name in ("rebalance_interval", "transfer_timeout"):
            if parse_duration_us(getattr(self, name)) <= 0:
                raise ValueError(f"escrow.{name} must be positive")
        return self


@dataclass(frozen=True, slots=True)
class Escrow:
    """The escrow settings, resolved (see EscrowSpec)."""

    partitions: int
    floor: float
    rebalance_interval_us: int
    transfer_timeout_us: int
    tenants: frozenset[str] = frozenset()  # whose subjects spread, their limits in slices

    def partition_names(self) -> tuple[str, ...]:
        return tuple(f"p:{index}" for index in range(self.partitions))

    def floor_units(self, limit: int) -> int:
        """What a slice of `limit` keeps when it gives capacity away: at least one unit."""
        return max(1, int(limit / self.partitions * self.floor))


class ModelSpec(_Strict):
    """How to count and price one model's calls."""

    encoding: Literal["cl100k_base", "o200k_base"] | None = None
    calibration: float | int = Field(default=1.0, ge=0.1, le=10.0)
    price: PriceSpec | None = None
    output_estimate: Literal["max_tokens", "learned"] = "max_tokens"
    learned_quantile: float = Field(default=0.95, gt=0.5, lt=1.0)
    learned_min_samples: int = Field(default=100, ge=1, le=1_000_000)
    learned_window: int = Field(default=10_000, ge=10, le=10_000_000)
    # Overrides of the price catalog (see catalog.py), each on its own.
    catalog_name: str | None = Field(default=None, min_length=1, max_length=256)  # the name to look up
    provider: str | None = Field(default=None, min_length=1, max_length=64)  # the catalog's provider id
    service_tiers: dict[Literal["batch", "flex", "priority"], PriceSpec] = Field(default_factory=dict)
    context_window: int | None = Field(default=None, ge=1, le=10**9)  # input + output, in tokens
    max_output_tokens: int | None = Field(default=None, ge=0, le=10**9)  # 0: no output (embeddings)

    @model_validator(mode="after")
    def _fits(self) -> ModelSpec:
        if (
            self.context_window
            and self.max_output_tokens is not None
            and self.max_output_tokens > self.context_window
        ):
            raise ValueError(
                f"max_output_tokens {self.max_output_tokens} is more than context_window {self.context_window}"
            )
        return self


# Encodings quotad counts with: tiktoken's others (p50k, r50k, gpt2) belong to retired models.
# o200k_harmony (gpt-oss) is o200k_base plus special tokens, which plain text never encodes to.
_BUNDLED = {"cl100k_base": "cl100k_base", "o200k_base": "o200k_base", "o200k_harmony": "o200k_base"}
# Prefixes callers put before OpenAI model names (LiteLLM-style routes), stripped before the lookup.
_ROUTE_PREFIXES = ("openai/", "azure/")


def default_encoding(model: str) -> str | None:
    """The tiktoken encoding of an OpenAI model name, resolved as tiktoken resolves it (its exact
    names, then its prefixes: fine-tunes `ft:gpt-4o-mini-...`, Azure's `gpt-35-turbo`, embeddings,
    `davinci-002`, `gpt-oss-*`), after stripping an `openai/` or `azure/` route; None for other
    vendors' models and for names tiktoken does not know (`o1x-custom` is not o1)."""
    for prefix in _ROUTE_PREFIXES:
        model = model.removeprefix(prefix)
    name = MODEL_TO_ENCODING.get(model)
    if name is None:
        name = next(
            (encoding for prefix, encoding in MODEL_PREFIX_TO_ENCODING.items() if model.startswith(prefix)),
            None,
        )
    return _BUNDLED.get(name) if name else None


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """A model's resolved settings."""

    name: str
    encoding: str | None
    calibration: float
    price: Price | None
    learned: bool
    learned_quantile: float
    learned_min_samples: int
    learned_window: int = 10_000
    service_tiers: dict[ServiceTier, Price] = field(default_factory=dict)
    context_window: int | None = None
    max_output_tokens: int | None = None
    catalog_name: str | None = None
    provider: str | None = None


class TenantGrantSpec(_Strict):
    """How a caller acts for one tenant: `tier` fixes the tier, `tiers` lets it choose among some;
    neither: the tier as requested (or the default)."""

    tier: str | None = None
    tiers: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_way(self) -> TenantGrantSpec:
        if self.tier is not None and self.tiers is not None:
            raise ValueError("give tier (fixed) or tiers (the caller chooses), not both")
        return self


class CallerSpec(_Strict):
    """What the callers whose identity matches may do (see the README, Security)."""

    tenants: dict[str, TenantGrantSpec] = Field(min_length=1)
    methods: list[Method] = Field(default_factory=lambda: [Method.RESERVE, Method.SETTLE, Method.READ])

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for method in value:
            if method not in Method.__members__.values():
                raise ValueError(f"unknown method {method!r}: expected some of {', '.join(Method)}")
        return [Method(method) for method in value]


ENVOY_ROLES = ("tenant", "subject", "tier", "model", "priority")


class EnvoyDomainSpec(_Strict):
    """How the descriptors of one Envoy rate limit domain become one quotad request: which
    descriptor entry key names each part of it (as the route's rate limit actions produce them,
    e.g. `x-tenant`, `user_id`), and what hits_addend counts."""

    tenant: str | None = None
    subject: str | None = None
    tier: str | None = None
    model: str | None = None
    priority: str | None = None
    default_subject: str | None = None  # when no descriptor names the subject
    default_tier: str | None = None  # when no descriptor names the tier (else the policy's default)
    # requests: each call is one request (hits_addend 0 only checks);
    # tokens: hits_addend counts tokens already spent (charged), 0 only checks.
    hits: Literal["requests", "tokens"] = "requests"

    @model_validator(mode="after")
    def _keys(self) -> EnvoyDomainSpec:
        keys = [getattr(self, role) for role in ENVOY_ROLES if getattr(self, role) is not None]
        if not keys:
            raise ValueError(f"name the descriptor entry key of at least one of {', '.join(ENVOY_ROLES)}")
        if len(set(keys)) != len(keys):
            raise ValueError("each role needs its own descriptor entry key")
        if any(not key.strip() for key in keys):
            raise ValueError("a descriptor entry key must not be empty")
        if self.subject is None and self.default_subject is None:
            raise ValueError("give subject (an entry key) or default_subject: every decision has a subject")
        return self


class EnvoySpec(_Strict):
    """Envoy's rate limit service (envoy.service.ratelimit.v3), served beside quotad.v1."""

    domains: dict[str, EnvoyDomainSpec] = Field(min_length=1)
    # What a gateway gets when Redis cannot decide: an error (UNAVAILABLE; Envoy then applies its
    # failure_mode_deny), OK (fail open) or OVER_LIMIT (fail closed).
    store_unavailable: Literal["unavailable", "ok", "over_limit"] = "unavailable"


@dataclass(frozen=True, slots=True)
class EnvoyDomain:
    """One domain's mapping: role (tenant, subject, ...) -> descriptor entry key."""

    keys: dict[str, str]
    default_subject: str | None
    hits: str
    default_tier: str | None = None


@dataclass(frozen=True, slots=True)
class EnvoyPolicy:
    domains: dict[str, EnvoyDomain]
    store_unavailable: str = "unavailable"


class PolicyDocument(_Strict):
    version: Literal[1] = 1
    defaults: Defaults
    leases: Leases = Field(default_factory=Leases)
    retention: Duration = "24h"
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    tiers: dict[str, TierGroup]
    tenants: dict[str, LimitGroup] = Field(default_factory=dict)
    global_: LimitGroup = Field(default_factory=LimitGroup, alias="global")
    admission: AdmissionSpec | None = None  # the default ceilings of every tenant and global limit
    waiting: WaitingSpec = Field(default_factory=WaitingSpec)
    # Who may ask for what; when present, every call needs an identity (certificate or token).
    callers: dict[str, CallerSpec] = Field(default_factory=dict)
    # Tenants not named under `tenants`: each with counters of its own (own), all sharing one set
    # (shared: naming new tenants escapes no cap), or refused.
    unknown_tenants: Literal["own", "shared", "refuse"] = "own"
    # Envoy's rate limit service: how descriptors map to requests (see docs/envoy.md).
    envoy: EnvoySpec | None = None
    # Where prices and context windows come from when `models` does not say: the bundled
    # genai-prices catalog (see catalog.py), or nowhere.
    price_catalog: Literal["genai-prices", "none"] = "genai-prices"
    # Global limits split into per-partition slices, so that decisions spread over partitions.
    escrow: EscrowSpec | None = None

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        parse_duration_us(value)
        return value

    def _check_escrow(self) -> None:
        if self.escrow is None:
            return
        sliced = [("global", self.global_)]
        for tenant in self.escrow.tenants:
            if tenant == WILDCARD_TENANT or tenant not in self.tenants:
                raise ValueError(
                    f"escrow.tenants: {tenant!r} is not a tenant named under tenants (only named"
                    " tenants' limits can be split into slices)"
                )
            sliced.append((f"tenants.{tenant}", self.tenants[tenant]))
        for where, group in sliced:
            for index, spec in enumerate(group.limits):
                if spec.metric is Metric.CONCURRENT or spec.period in CALENDARS:
                    raise ValueError(
                        f"{where}.limits[{index}] ({spec.name!r}): escrow splits token buckets and"
                        " sliding windows only; a concurrent limit or a calendar budget cannot be in"
                        " escrow"
                    )

    def _check_envoy(self) -> None:
        for name, domain in (self.envoy.domains if self.envoy else {}).items():
            if domain.default_tier is not None and domain.default_tier not in self.tiers:
                raise ValueError(
                    f"envoy.domains.{name}.default_tier {domain.default_tier!r} is not one of the tiers"
                )

    @model_validator(mode="after")
    def _references(self) -> PolicyDocument:
        if self.defaults.tier not in self.tiers:
            raise ValueError(f"defaults.tier {self.defaults.tier!r} is not one of the tiers")
        groups = [*self.tiers.values(), *self.tenants.values(), self.global_]
        for group in groups:
            for spec in group.limits:
                if spec.model is not None and self.models and spec.model not in self.models:
                    raise ValueError(f"limit {spec.name!r} names model {spec.model!r}, not in models")
                if spec.metric is Metric.COST_USD and not self.models:
                    raise ValueError(f"cost limit {spec.name!r} needs a models section with prices")
        self._check_envoy()
        self._check_escrow()
        known = {*self.tenants, self.defaults.tenant} - {WILDCARD_TENANT}
        for identity, caller in self.callers.items():
            if not identity.strip():
                raise ValueError("callers: an identity (or pattern) must not be empty")
            for tenant, grant in caller.tenants.items():
                for tier in [grant.tier] if grant.tier else grant.tiers or []:
                    if tier not in self.tiers:
                        raise ValueError(
                            f"callers.{identity}.tenants.{tenant}: tier {tier!r} is not one of the tiers"
                        )
                if self.unknown_tenants == "refuse" and tenant != WILDCARD_TENANT and tenant not in known:
                    raise ValueError(
                        f"callers.{identity}.tenants: {tenant!r} is refused (unknown_tenants: refuse); name it under tenants"
                    )
        return self


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy with its lookups computed once."""

    source: str
    default_tenant: str
    default_tier: str
    lease_default_us: int
    lease_min_us: int
    lease_max_us: int
    retention_us: int
    models: dict[str, ModelPolicy]
    tier_limits: dict[str, tuple[Limit, ...]]
    tier_priority: dict[str, Priority]
    max_wait_us: int
    max_line: int
    aging_us: int
    heartbeat_us: int
    tenant_limits: dict[str, tuple[Limit, ...]]
    global_limits: tuple[Limit, ...]
    callers: tuple[CallerRule, ...] = ()  # exact identities first, then patterns, the longest first
    unknown_tenants: str = "own"
    known_tenants: frozenset[str] = frozenset()
    envoy: EnvoyPolicy | None = None
    price_catalog: bool = True
    escrow: Escrow | None = None
    _cache: dict[tuple[str, str, str], tuple[Limit, ...]] = field(default_factory=dict, compare=False)

    def limits_for(self, tier: str, tenant: str, model: str) -> tuple[Limit, ...]:
        """Every limit that applies to one request, subject scope first, then tenant, then global."""
        key = (tier, tenant, model)
        found = self._cache.get(key)
        if found is None:
            tenant_group = self.tenant_limits.get(tenant, self.tenant_limits.get(WILDCARD_TENANT, ()))
            found = tuple(
                limit
                for limit in (*self.tier_limits[tier], *tenant_group, *self.global_limits)
                if limit.applies_to(model)
            )
            if len(self._cache) < 10_000:  # tenants are open-ended; keep the memo bounded
                self._cache[key] = found
        return found

    def spreads(self, tenant: str) -> bool:
        """Whether `tenant`'s subjects spread over the escrow partitions (escrow.tenants)."""
        return self.escrow is not None and tenant in self.escrow.tenants

    def partition(self, tenant: str, subject: str = "") -> str:
        """The unit of atomicity: all keys one decision touches share it.

        With global limits every decision touches the same global counters, so
        everything lives in one partition; otherwise each tenant is its own. With
        escrow, tenants hash into `escrow.partitions` partitions, each holding its
        tenants' counters and one slice of every global limit; the subjects of a
        tenant in escrow.tenants hash into them one by one, each partition holding
        one slice of each of that tenant's limits (`subject` matters only then).
        """
        if self.escrow is not None:
            if tenant in self.escrow.tenants:
                spread = zlib.crc32(subject.encode(), zlib.crc32(tenant.encode() + b"\n"))
                return f"p:{spread % self.escrow.partitions}"
            if self.global_limits:
                return f"p:{zlib.crc32(tenant.encode()) % self.escrow.partitions}"
        return "global" if self.global_limits else f"t:{tenant}"


def _format_location(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            name = "global" if part == "global_" else part
            path += f".{name}" if path else name
    return path or "(top level)"


def parse_policy(text: str, source: str) -> Policy:
    """Validate a policy from YAML text; `source` names it in error messages."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: (top level): expected a mapping, got {type(raw).__name__}")
    try:
        doc = PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            location = _format_location(tuple(error["loc"]))
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {location}: {message} (got {error['input']!r})")
        raise PolicyError("\n".join(lines)) from None
    return Policy(
        source=source,
        default_tenant=doc.defaults.tenant,
        default_tier=doc.defaults.tier,
        lease_default_us=parse_duration_us(doc.leases.default),
        lease_min_us=parse_duration_us(doc.leases.min),
        lease_max_us=parse_duration_us(doc.leases.max),
        retention_us=parse_duration_us(doc.retention),
        models={
            name: ModelPolicy(
                name=name,
                encoding=spec.encoding or default_encoding(name) or default_encoding(spec.catalog_name or ""),
                calibration=float(spec.calibration),
                price=spec.price.to_price() if spec.price else None,
                learned=spec.output_estimate == "learned",
                learned_quantile=spec.learned_quantile,
                learned_min_samples=spec.learned_min_samples,
                learned_window=spec.learned_window,
                service_tiers={
                    ServiceTier(tier): price.to_price() for tier, price in spec.service_tiers.items()
                },
                context_window=spec.context_window,
                max_output_tokens=spec.max_output_tokens,
                catalog_name=spec.catalog_name,
                provider=spec.provider,
            )
            for name, spec in doc.models.items()
        },
        tier_limits={
            name: tuple(s.to_limit(Scope.SUBJECT) for s in g.limits) for name, g in doc.tiers.items()
        },
        tier_priority={name: Priority(group.priority) for name, group in doc.tiers.items()},
        max_wait_us=parse_duration_us(doc.waiting.max_wait),
        max_line=doc.waiting.max_line,
        aging_us=parse_duration_us(doc.waiting.aging),
        heartbeat_us=parse_duration_us(doc.waiting.heartbeat),
        tenant_limits={
            name: tuple(
                replace(
                    s.to_limit(Scope.TENANT, doc.admission),
                    slices=doc.escrow.partitions if doc.escrow and name in doc.escrow.tenants else 0,
                )
                for s in g.limits
            )
            for name, g in doc.tenants.items()
        },
        global_limits=tuple(
            replace(
                s.to_limit(Scope.GLOBAL, doc.admission), slices=doc.escrow.partitions if doc.escrow else 0
            )
            for s in doc.global_.limits
        ),
        callers=_caller_rules(doc),
        unknown_tenants=doc.unknown_tenants,
        known_tenants=frozenset({*doc.tenants, doc.defaults.tenant} - {WILDCARD_TENANT}),
        price_catalog=doc.price_catalog == "genai-prices",
        envoy=_envoy(doc.envoy),
        escrow=Escrow(
            doc.escrow.partitions,
            float(doc.escrow.floor),
            parse_duration_us(doc.escrow.rebalance_interval),
            parse_duration_us(doc.escrow.transfer_timeout),
            frozenset(doc.escrow.tenants),
        )
        if doc.escrow
        else None,
    )


def _envoy(spec: EnvoySpec | None) -> EnvoyPolicy | None:
    if spec is None:
        return None
    return EnvoyPolicy(
        domains={
            name: EnvoyDomain(
                keys={role: key for role in ENVOY_ROLES if (key := getattr(domain, role)) is not None},
                default_subject=domain.default_subject,
                hits=domain.hits,
                default_tier=domain.default_tier,
            )
            for name, domain in spec.domains.items()
        },
        store_unavailable=spec.store_unavailable,
    )


def _caller_rules(doc: PolicyDocument) -> tuple[CallerRule, ...]:
    """The callers section, in the order identities are matched: exact ones first, then patterns
    with `*`, the longest (most specific) first."""
    rules = [
        CallerRule(
            pattern=identity,
            tenants={
                tenant: TenantGrant(grant.tier, tuple(grant.tiers or ()))
                for tenant, grant in spec.tenants.items()
            },
            methods=frozenset(spec.methods),
            default_tenant=next(
                (tenant for tenant in spec.tenants if tenant != WILDCARD_TENANT), doc.defaults.tenant
            ),
        )
        for identity, spec in doc.callers.items()
    ]
    return tuple(sorted(rules, key=lambda rule: ("*" in rule.pattern, -len(rule.pattern))))


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_policy(text, str(path))
