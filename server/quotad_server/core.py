"""The decisions: validate -> resolve the limits -> reserve / settle / peek.

The core speaks model types, raises errors.py exceptions and talks to a Store;
it knows neither gRPC nor Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import tiktoken

from quotad_server.auth import ANONYMOUS, Authorization, Caller
from quotad_server.catalog import Catalog, ModelTerms, resolve
from quotad_server.errors import FieldViolation, InvalidRequest, NotReady, QuotadError
from quotad_server.learning import OutputEstimator, UsageRecorder
from quotad_server.model import (
    AccuracyReport,
    Algorithm,
    Cost,
    Decision,
    DenyReason,
    Limit,
    LimitStatus,
    Metric,
    OutputSource,
    Priority,
    ReserveOutcome,
    Scope,
    ServiceTier,
    SettleOutcome,
    UsageReport,
)
from quotad_server.policy import Policy, default_encoding
from quotad_server.store import ReservePlan, ReserveResult, Store
from quotad_server.tokens import ChatMessage, TokenCounter, ToolDefinition, tool_parameters
from quotad_server.usage_stats import UsageSample, merge, output_quantile, ratio_quantile

MAX_TOKENS = 10**9
MAX_ID_BYTES = 256
_PRIORITY_RANK = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2}
# Counting this much text takes ~0.2 ms here (2 KB: 43 us), about one RPC's own work: cheaper in place
# than a hop to a thread, whose wake-ups cost more than that under load. Larger prompts go to a thread.
INLINE_COUNT_BYTES = 8192
MESSAGE_OVERHEAD_BYTES = 16
"""What a chat message counts for against max_prompt_bytes beyond its text: its framing, as a
model charges tokens for each message. So the bound on a prompt's size bounds its messages too."""
MAX_IMAGE_SIDE = 100_000
MAX_PULL_BACKOFF = 10
"""Escrow: while pulls find nothing, a replica pulls a slice at most every this many rebalance intervals."""
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(slots=True)  # a value, but not frozen: see quotad_server.model
class ReserveRequest:
    """One CheckAndReserve, as the caller sent it (defaults not yet applied)."""

    subject: str
    tenant: str = ""
    tier: str = ""
    model: str = ""
    input_tokens: int = 0
    max_output_tokens: int = 0
    lease_us: int | None = None
    idempotency_key: str = ""
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    priority: Priority | None = None
    max_wait_us: int = 0
    time_left_s: float | None = None  # until the caller's own deadline, if it set one
    caller: Caller = ANONYMOUS
    service_tier: ServiceTier = ServiceTier.STANDARD
    tools: tuple[ToolDefinition, ...] = ()


class Hits(StrEnum):
    """What a decision without a reservation does (Envoy's rate limit service has no Commit)."""

    RESERVE = "reserve"  # decide all or nothing and charge, for good: nothing is settled later
    CHECK = "check"  # charge nothing: denied when an enforced limit has nothing left
    CHARGE = "charge"  # usage already spent (tokens after the response): charged, never denied


@dataclass(frozen=True, slots=True)
class _Route:
    """What a request's (tenant charged, tier as authorized, model) resolve to under one policy."""

    tier: str
    limits: tuple[Limit, ...]
    partition: str
    terms: ModelTerms  # prices, context window, maximum output
    priority: Priority  # the tier's default
    counts_output: bool  # some limit counts output tokens (or money)
    slice_index: int = 0  # with escrow: the partition's index, whose slices it is charged to
    spread: bool = False  # a tenant in escrow.tenants: the partition is each subject's own


def _check_text(violations: list[FieldViolation], field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(field, "required"))
        return
    if len(value.encode()) > MAX_ID_BYTES:
        violations.append(FieldViolation(field, f"at most {MAX_ID_BYTES} bytes"))
    if _CONTROL.search(value):
        violations.append(FieldViolation(field, "must not contain control characters"))


def _check_tokens(violations: list[FieldViolation], field: str, value: int) -> None:
    if not 0 <= value <= MAX_TOKENS:
        violations.append(FieldViolation(field, f"must be between 0 and {MAX_TOKENS}, got {value}"))


_COUNTS_OUTPUT = (Metric.OUTPUT_TOKENS, Metric.TOTAL_TOKENS, Metric.COST_USD)


def _actual_usage(
    reservation_id: str,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int,
    cache_write_input_tokens: int = 0,
) -> Cost:
    violations: list[FieldViolation] = []
    _check_tokens(violations, "input_tokens", input_tokens)
    _check_tokens(violations, "output_tokens", output_tokens)
    if cache_write_input_tokens < 0:
        violations.append(
            FieldViolation(
                "cache_write_input_tokens", f"must not be negative, got {cache_write_input_tokens}"
            )
        )
    elif cache_write_input_tokens > input_tokens - max(0, cached_input_tokens):
        violations.append(
            FieldViolation(
                "cache_write_input_tokens",
                f"{cache_write_input_tokens} is more than input_tokens ({input_tokens}) less cached_input_tokens"
                f" ({cached_input_tokens}): input_tokens include cache writes",
            )
        )
    if cached_input_tokens < 0:
        violations.append(
            FieldViolation("cached_input_tokens", f"must not be negative, got {cached_input_tokens}")
        )
    elif cached_input_tokens > input_tokens:
        violations.append(
            FieldViolation(
                "cached_input_tokens",
                f"{cached_input_tokens} is more than input_tokens ({input_tokens}), which include cache reads",
            )
        )
    if not reservation_id:
        violations.append(FieldViolation("reservation_id", "required"))
    if violations:
        raise InvalidRequest(violations)
    return Cost(1, input_tokens, output_tokens, cached_input_tokens, 0, cache_write_input_tokens)


def _check_parts(violations: list[FieldViolation], request: ReserveRequest) -> None:
    """The messages' roles, names, tool calls and images, and the tools' definitions."""
    for index, message in enumerate(request.messages):
        _check_text(violations, f"messages[{index}].role", message.role, required=True)
        _check_text(violations, f"messages[{index}].name", message.name, required=False)
        _check_text(violations, f"messages[{index}].tool_call_id", message.tool_call_id, required=False)
        for at, call in enumerate(message.tool_calls):
            _check_text(violations, f"messages[{index}].tool_calls[{at}].name", call.name, required=True)
        for at, image in enumerate(message.images):
            if not (0 < image.width <= MAX_IMAGE_SIDE and 0 < image.height <= MAX_IMAGE_SIDE):
                violations.append(
                    FieldViolation(
                        f"messages[{index}].images[{at}]",
                        f"width and height must be between 1 and {MAX_IMAGE_SIDE} pixels,"
                        f" got {image.width}x{image.height}",
                    )
                )
    for index, tool in enumerate(request.tools):
        _check_text(violations, f"tools[{index}].name", tool.name, required=True)
        try:
            tool_parameters(tool)
        except ValueError as error:  # json.JSONDecodeError is one
            violations.append(
                FieldViolation(f"tools[{index}].parameters_json", f"not a JSON Schema object: {error}")
            )


def _units(limit: Limit, plan: ReservePlan) -> int:
    """What `plan` costs on `limit`, as reserve.lua counts it."""
    metric = limit.metric
    if metric in (Metric.REQUESTS, Metric.CONCURRENT):
        return 1
    if metric is Metric.INPUT_TOKENS:
        return plan.input_tokens
    if metric is Metric.OUTPUT_TOKENS:
        return plan.output_tokens
    if metric is Metric.COST_USD:
        return plan.cost_micro_usd
    return plan.input_tokens + plan.output_tokens


def _slice_index(partition: str) -> int:
    """The index of an escrow partition ("p:<index>", see Policy.partition); 0 for the others."""
    return int(partition[2:]) if partition.startswith("p:") else 0


def _format_us(us: int) -> str:
    return f"{us / 1_000_000:g}s"


class QuotaCore:
    """Answers CheckAndReserve, Commit, Release and GetUsage against a policy and a store.

    `encodings` (name -> tiktoken encoding) arrive after start-up (see cli.py); until
    then requests that need counting fail with NotReady (UNAVAILABLE) and health
    stays NOT_SERVING.
    """

    def __init__(
        self,
        policy: Policy,
        store: Store,
        *,
        encodings: Mapping[str, tiktoken.Encoding] | None = None,
        max_prompt_bytes: int = 1 << 20,
        learning_refresh_s: float = 5.0,
        stats_flush_s: float = 1.0,
        catalog: Catalog | None = None,
    ) -> None:
        self.policy = policy
        self._catalog = catalog
        self._terms: dict[str, ModelTerms] = {}
        self._terms_policy: Policy | None = None
        self._store = store
        self.encodings = encodings
        self._max_prompt_bytes = max_prompt_bytes
        self._counters: dict[tuple[str, float], TokenCounter] = {}
        self._outputs = OutputEstimator(store, refresh_s=learning_refresh_s)
        self._recorder = UsageRecorder(store, flush_s=stats_flush_s)
        # Per line, this replica's waiters: their event and their rank in the line (the lowest goes first).
        self._waiters: dict[str, dict[asyncio.Event, int]] = {}  # line -> waiter -> rank
        self._routes: dict[tuple[str, str, str], _Route] = {}
        self._routes_policy: Policy | None = None
        self._authz: Authorization | None = None
        self._authz_policy: Policy | None = None
        self._final_limits: dict[tuple[Limit, ...], tuple[Limit, ...]] = {}
        # Escrow: per (limit, partition index), this replica's pull in progress, and when the next
        # may begin with the gap after the last (see _pull).
        # Keyed by (limit, partition index, tenant): a tenant limit in escrow has slices per tenant.
        self._pulls: dict[tuple[Limit, int, str], asyncio.Task[int]] = {}
        self._next_pull: dict[tuple[Limit, int, str], tuple[float, float]] = {}

    @property
    def catalog(self) -> Catalog | None:
        """The price catalog; set once it is loaded (after start, like the encodings)."""
        return self._catalog

    @catalog.setter
    def catalog(self, catalog: Catalog | None) -> None:
        self._catalog = catalog
        self._terms_policy = None  # what was resolved without it is resolved again
        self._routes_policy = None

    @property
    def max_messages(self) -> int:
        """The most chat messages a request may have (see MESSAGE_OVERHEAD_BYTES)."""
        return self._max_prompt_bytes // MESSAGE_OVERHEAD_BYTES

    @property
    def ready(self) -> bool:
        """True once the tokenizers are loaded."""
        return self.encodings is not None

    # -- counting ---------------------------------------------------------------------

    def _counter(self, model: str) -> TokenCounter:
        settings = self.policy.models.get(model)
        encoding_name = settings.encoding if settings else default_encoding(model)
        if encoding_name is None:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "model",
                        f"no tokenizer for {model!r}: set models.{model}.encoding (and calibration) in the policy",
                    )
                ]
            )
        if self.encodings is None:
            raise NotReady("the tokenizers are still loading")
        calibration = settings.calibration if settings else 1.0
        counter = self._counters.get((encoding_name, calibration))
        if counter is None:
            counter = TokenCounter(self.encodings[encoding_name], calibration)
            self._counters[(encoding_name, calibration)] = counter
        return counter

    async def _input_tokens(self, request: ReserveRequest) -> int:
        """The caller's input_tokens, or the count of its prompt or messages."""
        if not request.prompt and not request.messages:
            if request.tools:
                raise InvalidRequest([FieldViolation("tools", "only with messages")])
            return request.input_tokens
        violations: list[FieldViolation] = []
        if request.tools and request.prompt:
            violations.append(FieldViolation("tools", "only with messages, not with prompt"))
        if request.prompt and request.messages:
            violations.append(FieldViolation("prompt", "give prompt or messages, not both"))
        if request.input_tokens:
            field = "prompt" if request.prompt else "messages"
            violations.append(FieldViolation("input_tokens", f"give input_tokens or {field}, not both"))
        if not request.model:
            violations.append(FieldViolation("model", "required to count a prompt"))
        if len(request.messages) > self.max_messages:  # before looking at each of them
            violations.append(
                FieldViolation(
                    "messages",
                    f"more than {self.max_messages} messages (each counts {MESSAGE_OVERHEAD_BYTES} bytes"
                    f" of the {self._max_prompt_bytes} a prompt may have, its text aside)",
                )
            )
            raise InvalidRequest(violations)
        size = (
            len(request.prompt.encode())
            + sum(
                len(m.content.encode())
                + len(m.role)
                + len(m.name)
                + MESSAGE_OVERHEAD_BYTES
                + sum(len(c.name) + len(c.arguments.encode()) + MESSAGE_OVERHEAD_BYTES for c in m.tool_calls)
                + MESSAGE_OVERHEAD_BYTES * len(m.images)
                for m in request.messages
            )
            + sum(
                len(t.name)
                + len(t.description.encode())
                + len(t.parameters_json.encode())
                + MESSAGE_OVERHEAD_BYTES
                for t in request.tools
            )
        )
        if size > self._max_prompt_bytes:
            field = "prompt" if request.prompt else "messages"
            violations.append(FieldViolation(field, f"{size} bytes; at most {self._max_prompt_bytes}"))
        _check_parts(violations, request)
        if violations:
            raise InvalidRequest(violations)
        counter = self._counter(request.model)
        count = (
            functools.partial(counter.count_text, request.prompt)
            if request.prompt
            else functools.partial(counter.count_messages, request.messages, request.tools, request.model)
        )
        return count() if size <= INLINE_COUNT_BYTES else await asyncio.to_thread(count)

    # -- validation -------------------------------------------------------------------

    def _resolve_caller(
        self,
        violations: list[FieldViolation],
        subject: str,
        tenant: str,
        tier: str,
        model: str,
        *,
        need_model: bool,
    ) -> tuple[str, str]:
        policy = self.policy
        _check_text(violations, "subject", subject, required=True)
        _check_text(violations, "tenant", tenant, required=False)
        _check_text(violations, "tier", tier, required=False)
        _check_text(violations, "model", model, required=False)
        tier = tier or policy.default_tier
        if tier not in policy.tier_limits:
            known = ", ".join(sorted(policy.tier_limits))
            violations.append(FieldViolation("tier", f"unknown tier {tier!r}; the policy has: {known}"))
        if policy.models:
            if model and model not in policy.models:
                known = ", ".join(sorted(policy.models))
                violations.append(
                    FieldViolation("model", f"unknown model {model!r}; the policy has: {known}")
                )
            elif not model and need_model:
                violations.append(FieldViolation("model", "required: the policy names its models"))
        return tenant or policy.default_tenant, tier

    # -- the decisions ----------------------------------------------------------------

    def terms(self, model: str) -> ModelTerms:
        """The prices, context window and maximum output that apply to `model` (catalog + policy)."""
        policy = self.policy
        if self._terms_policy is not policy:
            self._terms.clear()
            self._terms_policy = policy
        found = self._terms.get(model)
        if found is None:
            catalog = self._catalog if policy.price_catalog else None
            found = resolve(catalog, model, policy.models.get(model))
            if len(self._terms) < 10_000:  # model names are the caller's: keep it bounded
                self._terms[model] = found
        return found

    async def _output_tokens(self, request: ReserveRequest, input_tokens: int) -> tuple[int, OutputSource]:
        """What to reserve for the output, and why.

        With max_output_tokens: it, or less once the model has learned. Without: the learned
        output, else the model's maximum output, else what its context window leaves after the
        input; never more than the window leaves. 0 only when nothing is known (then _plan
        refuses it if a limit counts output).
        """
        requested = request.max_output_tokens
        if not 0 <= requested <= MAX_TOKENS or not 0 <= input_tokens <= MAX_TOKENS:
            return requested, OutputSource.REQUESTED  # _plan refuses it
        model = self.policy.models.get(request.model)
        tier = request.tier or self.policy.default_tier
        learned = None
        if model is not None and model.learned and tier in self.policy.tier_limits:
            learned = await self._outputs.learned(model, tier, requested)
        if requested:
            if learned is not None and learned < requested:
                return learned, OutputSource.LEARNED
            return requested, OutputSource.REQUESTED
        terms = self.terms(request.model)
        bounds = [terms.max_output_tokens]
        if terms.context_window is not None:
            bounds.append(max(0, terms.context_window - input_tokens))
        known = [bound for bound in bounds if bound is not None]
        maximum = min(known) if known else None
        if learned is not None:
            return (learned if maximum is None else min(learned, maximum)), OutputSource.LEARNED
        if maximum is None:
            return 0, OutputSource.REQUESTED
        return maximum, OutputSource.MODEL_MAXIMUM

    def plan_for(self, request: ReserveRequest, input_tokens: int) -> ReservePlan:
        """What `request` would reserve, with `input_tokens` counted: for tools such as the benchmark."""
        return self._plan(request, input_tokens, request.max_output_tokens)[0]

    def _route(self, policy: Policy, tenant: str, tier: str, model: str) -> _Route | None:
        """A (tenant, tier, model) as sent, already resolved and validated under `policy`, if seen."""
        if self._routes_policy is not policy:
            self._routes.clear()
            self._routes_policy = policy
        return self._routes.get((tenant, tier, model))

    def _plan(
        self,
        request: ReserveRequest,
        input_tokens: int,
        output_tokens: int,
        output_source: OutputSource = OutputSource.REQUESTED,
        *,
        fit: bool = True,
    ) -> tuple[ReservePlan, str]:
        """Validate a request and resolve its limits and cost; returns the plan and the tier.

        `fit=False` skips the model's context window and maximum output: Envoy's hits are an
        amount to count, not a prompt and a reply the model must hold.
        """
        policy = self.policy
        violations: list[FieldViolation] = []
        # Who may act for which tenant, at which tier, and whose counters it charges (unknown
        # tenants may share one set): the policy's callers decide before anything is resolved.
        tenant, counted_as, tier = self.authorization().reserve(request.caller, request.tenant, request.tier)
        route_key = (counted_as, tier, request.model)
        route = self._route(policy, *route_key)
        if route is None:
            _, tier = self._resolve_caller(
                violations, request.subject, tenant, tier, request.model, need_model=True
            )
        else:
            _check_text(violations, "subject", request.subject, required=True)
            _check_text(violations, "tenant", tenant, required=False)  # the route may be another's
            tier = route.tier
        _check_tokens(violations, "input_tokens", input_tokens)
        _check_tokens(violations, "max_output_tokens", request.max_output_tokens)
        _check_text(violations, "idempotency_key", request.idempotency_key, required=False)
        if not 0 <= request.max_wait_us <= policy.max_wait_us:
            violations.append(
                FieldViolation(
                    "max_wait",
                    f"must be between 0 and {_format_us(policy.max_wait_us)}, got {_format_us(request.max_wait_us)}",
                )
            )
        lease_us = policy.lease_default_us if request.lease_us is None else request.lease_us
        if not policy.lease_min_us <= lease_us <= policy.lease_max_us:
            violations.append(
                FieldViolation(
                    "lease",
                    f"must be between {_format_us(policy.lease_min_us)}"
                    f" and {_format_us(policy.lease_max_us)}, got {_format_us(lease_us)}",
                )
            )
        if route is None and not violations:
            route = self._new_route(policy, violations, route_key, counted_as, tier)
        if route is not None and not violations and fit:
            self._check_fit(violations, request, route, input_tokens, output_source)
        if violations:
            raise InvalidRequest(violations)
        assert route is not None
        price = route.terms.price(request.service_tier)
        priority = request.priority or route.priority
        fingerprint = ""
        # The standard tier adds nothing, so keys retried across an upgrade keep their fingerprint.
        tier_suffix = "" if request.service_tier is ServiceTier.STANDARD else f"\n{request.service_tier}"
        if request.idempotency_key:
            fingerprint = hashlib.sha256(
                f"{tier}\n{request.model}\n{input_tokens}\n{request.max_output_tokens}{tier_suffix}".encode()
            ).hexdigest()[:32]
        partition, slice_index = route.partition, route.slice_index
        if route.spread:
            partition = policy.partition(counted_as, request.subject)
            slice_index = _slice_index(partition)
        plan = ReservePlan(
            partition=partition,
            tenant=tenant,
            counted_as=counted_as,
            subject=request.subject,
            limits=route.limits,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            lease_us=lease_us,
            record_ttl_us=lease_us + policy.retention_us,
            idempotency_key=request.idempotency_key,
            fingerprint=fingerprint,
            cost_micro_usd=price.cost_micro_usd(input_tokens, 0, output_tokens) if price else 0,
            price=price,
            model=request.model,
            tier=tier,
            max_output_tokens=request.max_output_tokens,
            priority=priority,
            boost_us=_PRIORITY_RANK[priority] * policy.aging_us,
            max_line=policy.max_line,
            ticket_ttl_ms=3 * policy.heartbeat_us // 1000,
            slice_index=slice_index,
        )
        return plan, tier

    def _new_route(
        self,
        policy: Policy,
        violations: list[FieldViolation],
        key: tuple[str, str, str],
        counted_as: str,
        tier: str,
    ) -> _Route | None:
        """Resolve a valid (tenant charged, tier, model) and remember it under `key`; None (and a
        violation) if it cannot work."""
        model_name = key[2]
        limits = policy.limits_for(tier, counted_as, model_name)
        terms = self.terms(model_name)
        if terms.price() is None and any(limit.metric is Metric.COST_USD for limit in limits):
            violations.append(
                FieldViolation(
                    "model",
                    f"{model_name!r} has no price in the policy or the price catalog, which cost limits need",
                )
            )
            return None
        route = _Route(
            tier,
            limits,
            policy.partition(counted_as),
            terms,
            policy.tier_priority[tier],
            any(limit.metric in _COUNTS_OUTPUT for limit in limits),
            _slice_index(policy.partition(counted_as)),
            policy.spreads(counted_as),
        )
        if len(self._routes) >= 10_000:  # tenants and subjects' tiers are open-ended; keep it bounded
            self._routes.clear()
        self._routes[key] = route
        return route

    @staticmethod
    def _check_fit(
        violations: list[FieldViolation],
        request: ReserveRequest,
        route: _Route,
        input_tokens: int,
        output_source: OutputSource,
    ) -> None:
        """Refuse what the model cannot take (its context window, its maximum output) and what
        cannot be priced or bounded, before anything is charged."""
        terms = route.terms
        if not 0 <= input_tokens <= MAX_TOKENS or not 0 <= request.max_output_tokens <= MAX_TOKENS:
            return  # already refused
        requested = request.max_output_tokens
        window, maximum = terms.context_window, terms.max_output_tokens
        if maximum is not None and requested > maximum:
            violations.append(
                FieldViolation(
                    "max_output_tokens",
                    f"{requested} is more than {request.model}'s maximum output ({maximum} tokens)",
                )
            )
        if window is not None and input_tokens + requested > window:
            field = "max_output_tokens" if requested and input_tokens < window else "input_tokens"
            violations.append(
                FieldViolation(
                    field,
                    f"input ({input_tokens}) + max_output_tokens ({requested}) is more than"
                    f" {request.model}'s context window ({window} tokens)",
                )
            )
        elif window is not None and not requested and maximum != 0 and input_tokens >= window:
            violations.append(
                FieldViolation(
                    "input_tokens",
                    f"input ({input_tokens}) leaves no room for output in {request.model}'s context window"
                    f" ({window} tokens)",
                )
            )
        unknown = not requested and output_source is OutputSource.REQUESTED  # no default was found
        if unknown and request.model and route.counts_output and not violations:
            violations.append(
                FieldViolation(
                    "max_output_tokens",
                    f"required: {request.model or 'the model'} has no known maximum output or context window"
                    " and nothing learned yet (set models.<name>.max_output_tokens in the policy)",
                )
            )
        if (
            request.service_tier is not ServiceTier.STANDARD
            and terms.price(request.service_tier) is None
            and any(limit.metric is Metric.COST_USD for limit in route.limits)
        ):
            violations.append(
                FieldViolation(
                    "service_tier",
                    f"{request.model!r} has no {request.service_tier.value} price in the policy or the catalog",
                )
            )

    def authorization(self) -> Authorization:
        """The policy's callers rules, for the policy in force (it may have been reloaded)."""
        policy = self.policy
        if self._authz is None or self._authz_policy is not policy:
            self._authz, self._authz_policy = Authorization(policy), policy
        return self._authz

    def _outcome(
        self,
        plan: ReservePlan,
        tier: str,
        result: ReserveResult,
        output_source: OutputSource = OutputSource.REQUESTED,
    ) -> ReserveOutcome:
        if not result.allowed:
            return self._denial(plan.tenant, tier, result.limits, plan.priority)
        return ReserveOutcome(
            decision=Decision.ALLOWED,
            tenant=plan.tenant,
            tier=tier,
            limits=result.limits,
            reservation_id=result.reservation_id,
            lease_expires_at_us=result.lease_expires_at_us,
            reserved=result.reserved,
            counted_input_tokens=plan.input_tokens,
            replayed=result.replayed,
            priority=plan.priority,
            output_source=output_source,
        )

    async def check_and_reserve(self, request: ReserveRequest) -> ReserveOutcome:
        """Reserve the request's estimated cost on every applicable limit, or deny it.

        With `max_wait_us`, a request that does not fit now waits in line (priority, then
        arrival) and is admitted as soon as it fits, or denied when the wait runs out.
        """
        input_tokens = await self._input_tokens(request)
        output_tokens, source = await self._output_tokens(request, input_tokens)
        plan, tier = self._plan(request, input_tokens, output_tokens, source)
        if request.time_left_s is not None:
            plan = replace(plan, deadline=asyncio.get_running_loop().time() + request.time_left_s)
        if request.max_wait_us <= 0:
            return self._outcome(plan, tier, await self._reserve(plan), source)
        return replace(
            await self._wait_in_line(plan, tier, request.max_wait_us / 1_000_000), output_source=source
        )

    async def _wait_in_line(self, plan: ReservePlan, tier: str, max_wait_s: float) -> ReserveOutcome:
        """Try, wait in line, try again when woken, until admitted or the wait is over.

        The wait ends at max_wait or at the caller's own deadline, whichever comes first, and
        the store's calls end by that deadline too: nothing is admitted for a caller that has
        left. A cancel (the caller gone) while a try is in flight is made good by the store,
        which undoes what that try reserved when its reply comes (see RedisStore).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        ends = started + max_wait_s if plan.deadline is None else min(started + max_wait_s, plan.deadline)
        heartbeat_s = self.policy.heartbeat_us / 1_000_000
        plan = replace(plan, ticket=secrets.token_hex(8), enqueue=True)
        woken, was_woken = asyncio.Event(), False
        line = ""
        admitted = False
        try:
            while True:
                result = await self._reserve(plan)
                waited_us = round((loop.time() - started) * 1_000_000)
                outcome = replace(self._outcome(plan, tier, result), waited_us=waited_us)
                if result.allowed:
                    admitted = True
                    return outcome
                if result.queue_full:
                    return replace(outcome, deny_reason=DenyReason.QUEUE_FULL)
                remaining_s = ends - loop.time()
                if outcome.retry_after_us is None or remaining_s <= 0:
                    return outcome  # never fits, or the wait is over
                # retry_after assumes no Commit or Release frees capacity sooner: wait for those too.
                retry_s = outcome.retry_after_us / 1_000_000
                if result.line != line:
                    self._waiters.get(line, {}).pop(woken, None)
                    line = result.line
                if line:
                    self._waiters.setdefault(line, {})[woken] = result.rank
                    if was_woken and result.spare:
                        # Woken for capacity this waiter cannot use (its priority's cap, say):
                        # the next of this replica's waiters may, so it tries now, not at its heartbeat.
                        self._wake(line, after=result.rank)
                woken.clear()
                # Capacity freed by a Commit or Release wakes us at once; refill and lease expiry
                # by retry_after; the heartbeat keeps our place alive. (asyncio.timeout, not
                # wait_for: Python 3.11's wait_for can swallow the cancel of a caller that left.)
                try:
                    async with asyncio.timeout(min(remaining_s, retry_s, heartbeat_s)):
                        await woken.wait()
                    was_woken = True
                except TimeoutError:
                    was_woken = False
        finally:
            self._waiters.get(line, {}).pop(woken, None)
            if line and not self._waiters.get(line):
                self._waiters.pop(line, None)
            if not admitted:
                with contextlib.suppress(QuotadError):
                    await asyncio.shield(self._store.leave_line(plan.partition, plan.ticket))

    def _wake(self, line: str, after: int | None = None) -> None:
        """Capacity was freed on `line`, or a place left it: wake this replica's best waiter there
        (ranked after `after`, when a waiter passes on capacity it cannot use).

        Only the best: the line admits in rank order, so the others would only be told to wait.
        The rank is the line's own (from Redis), so every replica wakes in the order the script
        admits in, aging included. Each replica wakes its own best, so the line's head, wherever
        it waits, tries at once.
        """
        waiters = self._waiters.get(line)
        if not waiters:
            return
        candidates = [(rank, event) for event, rank in waiters.items() if after is None or rank > after]
        if candidates:
            min(candidates, key=lambda item: item[0])[1].set()

    async def watch_wakeups(self) -> None:
        """Wake this replica's waiters when capacity is freed on their lines (runs until cancelled)."""
        await self._store.watch_wakeups(self._wake)

    async def check_and_reserve_many(
        self, requests: Sequence[ReserveRequest]
    ) -> list[ReserveOutcome | QuotadError]:
        """Decide each request on its own, all in one round trip; a failed item is its error, in place."""
        planned: list[tuple[ReservePlan, str, OutputSource] | QuotadError] = []
        for request in requests:
            try:
                counted = await self._input_tokens(request)
                output_tokens, source = await self._output_tokens(request, counted)
                planned.append((*self._plan(request, counted, output_tokens, source), source))
            except QuotadError as error:
                planned.append(error)
        plans = [item[0] for item in planned if not isinstance(item, QuotadError)]
        if requests and requests[0].time_left_s is not None:  # one caller, one deadline for the batch
            deadline = asyncio.get_running_loop().time() + requests[0].time_left_s
            plans = [replace(plan, deadline=deadline) for plan in plans]
        results = iter(await self._reserve_many(plans))
        outcomes: list[ReserveOutcome | QuotadError] = []
        for item in planned:
            if isinstance(item, QuotadError):
                outcomes.append(item)
                continue
            result = next(results)
            outcomes.append(
                result
                if isinstance(result, QuotadError)
                else self._outcome(item[0], item[1], result, item[2])
            )
        return outcomes

    # -- escrow: a global limit's slices follow the demand ------------------------------

    def _short_slices(self, statuses: Sequence[LimitStatus]) -> list[LimitStatus]:
        """The statuses of the slices (limits in escrow) that a denial lacks capacity on, when
        nothing but slices denied it and each could fit (a rebalance would not help otherwise)."""
        if self.policy.escrow is None:
            return []
        denying = [s for s in statuses if s.wait_us != 0 and not s.limit.shadow]
        if not denying or any(not s.limit.slices or s.wait_us is None for s in denying):
            return []
        return denying

    def _pull(
        self, limit: Limit, taker: int, need: int = 0, tenant: str = "", enough: int = 1
    ) -> asyncio.Task[int] | None:
        """Move unused capacity of `limit`'s other slices to slice `taker` (of `tenant`'s slices, for
        a tenant limit): one pull at a time per slice on this replica (those that come meanwhile
        share it), none sooner than escrow.rebalance_interval after the last began, and, while
        pulls find nothing (the limit is used up everywhere), twice as long after each, up to
        MAX_PULL_BACKOFF intervals: an exhausted limit costs Redis a few pulls per second, not one
        per denial. A pull that moves
        less than `enough` (what the denied request lacked) found nothing for the backoff: when
        every slice is busy and the limit used up, the bits that refill elsewhere would otherwise
        be pulled to and fro every interval (bench/skew.py --tenants 64: 2.1 scripts per decision,
        not 1.03). Returns the pull's task, whose result is the units moved, or None when no pull
        may start now (no coroutine, no task: a denial in the backoff costs next to nothing)."""
        escrow = self.policy.escrow
        if escrow is None:
            return None
        owner = tenant if limit.scope is Scope.TENANT else ""
        slot = (limit, taker, owner)
        task = self._pulls.get(slot)
        if task is None:
            loop = asyncio.get_running_loop()
            interval = escrow.rebalance_interval_us / 1_000_000
            not_before, gap = self._next_pull.get(slot, (0.0, interval))
            if loop.time() < not_before:
                return None
            self._next_pull[slot] = (loop.time() + gap, gap)
            if len(self._next_pull) > 10_000:
                self._next_pull.clear()
            task = loop.create_task(
                self._store.rebalance(
                    limit,
                    escrow.partition_names(),
                    taker,
                    escrow.floor_units(limit.limit),
                    escrow.transfer_timeout_us,
                    need=need,
                    tenant=owner,
                ),
                name="quotad-escrow-pull",
            )
            self._pulls[slot] = task

            def done(task: asyncio.Task[int]) -> None:
                self._pulls.pop(slot, None)
                moved = not task.cancelled() and task.exception() is None and task.result() >= enough
                began = self._next_pull.get(slot, (loop.time(), gap))[0] - gap
                after = interval if moved else min(2 * gap, MAX_PULL_BACKOFF * interval)
                self._next_pull[slot] = (began + after, after)

            task.add_done_callback(done)
        return task

    async def _rebalanced(self, plan: ReservePlan, result: ReserveResult) -> bool:
        """Pull capacity to the slices a denied plan lacks; True if any came (then try again)."""
        if result.allowed:
            return False
        return await self._rebalanced_for(plan, result.limits)

    async def _rebalanced_for(self, plan: ReservePlan, statuses: Sequence[LimitStatus]) -> bool:
        short = self._short_slices(statuses)
        pulls = []
        for status in short:
            units = _units(status.limit, plan)
            lacks = max(1, units - max(0, status.remaining))  # the denial's remaining is before it
            pulls.append((self._pull(status.limit, plan.slice_index, units, plan.counted_as, lacks), lacks))
        # The pulls run as tasks, together: awaiting them in turn takes as long as the slowest.
        enough = bool(pulls)
        for pull, lacks in pulls:
            moved = 0
            if pull is not None:
                # Shielded: a caller that gives up must not cancel a pull others share. A pull that
                # failed moved nothing: the denial stands, and recovery returns what it left in flight.
                with contextlib.suppress(QuotadError):
                    moved = await asyncio.shield(pull)
            enough = enough and moved >= lacks
        return enough  # try again only if every slice got what it lacked

    async def _reserve(self, plan: ReservePlan) -> ReserveResult:
        """store.reserve, and once more after a rebalance when only slices short of capacity denied it."""
        result = await self._store.reserve(plan)
        if not result.allowed and await self._rebalanced(plan, result):
            result = await self._store.reserve(plan)
        return result

    async def _reserve_many(self, plans: Sequence[ReservePlan]) -> list[ReserveResult | QuotadError]:
        results = await self._store.reserve_many(plans)
        if self.policy.escrow is None:
            return results
        again = [
            at
            for at, (plan, result) in enumerate(zip(plans, results, strict=True))
            if isinstance(result, ReserveResult) and await self._rebalanced(plan, result)
        ]
        if again:
            retried = await self._store.reserve_many([plans[at] for at in again])
            for at, result in zip(again, retried, strict=True):
                results[at] = result
        return results

    async def recover_escrow(self) -> int:
        """Give back the escrow capacity left in flight past its timeout (a replica died mid-transfer)."""
        escrow = self.policy.escrow
        if escrow is None:
            return 0
        return await self._store.recover_transfers(escrow.partition_names(), escrow.transfer_timeout_us)

    async def maintain_escrow(self) -> None:
        """Run recover_escrow every half transfer timeout (runs until cancelled): capacity left in
        flight comes back within 1.5 transfer timeouts while any replica runs."""
        while True:
            escrow = self.policy.escrow
            if escrow is not None:
                with contextlib.suppress(QuotadError):
                    await self.recover_escrow()
            await asyncio.sleep(escrow.transfer_timeout_us / 2_000_000 if escrow else 1.0)

    def _without_concurrency(self, limits: tuple[Limit, ...]) -> tuple[Limit, ...]:
        """`limits` less the concurrency limits, one tuple per `limits` (the store caches by identity)."""
        found = self._final_limits.get(limits)
        if found is None:
            if len(self._final_limits) >= 10_000:
                self._final_limits.clear()
            found = tuple(limit for limit in limits if limit.metric is not Metric.CONCURRENT)
            self._final_limits[limits] = found
        return found

    async def decide_hits(self, request: ReserveRequest, hits: Hits) -> ReserveOutcome:
        """Decide a request that nobody will Commit or Release (Envoy's ShouldRateLimit).

        The same plan and the same atomic reserve as CheckAndReserve, all or nothing, but final:
        concurrency limits are left out (no call ends a slot), the record lives one minimum
        lease, and nothing is refunded. `hits` says whether the request's cost is reserved,
        only checked (CHECK: denied when an enforced limit has nothing left; its wait is the
        time until that limit is fully reset) or charged whatever the limits say (CHARGE).
        """
        policy = self.policy
        request = replace(request, lease_us=policy.lease_min_us, max_wait_us=0)
        plan, tier = self._plan(request, request.input_tokens, request.max_output_tokens, fit=False)
        limits = self._without_concurrency(plan.limits)
        plan = replace(plan, limits=limits, record_ttl_us=plan.lease_us, forced=hits is Hits.CHARGE)
        if request.time_left_s is not None:
            plan = replace(plan, deadline=asyncio.get_running_loop().time() + request.time_left_s)
        if hits is not Hits.CHECK:
            return self._outcome(plan, tier, await self._reserve(plan))
        statuses = await self._check(plan, limits)
        if any(s.denied and not s.limit.shadow for s in statuses) and await self._rebalanced_for(
            plan, statuses
        ):
            statuses = await self._check(plan, limits)
        if any(s.denied and not s.limit.shadow for s in statuses):
            return self._denial(plan.tenant, tier, statuses, plan.priority)
        return ReserveOutcome(
            decision=Decision.ALLOWED, tenant=plan.tenant, tier=tier, limits=statuses, priority=plan.priority
        )

    async def _check(self, plan: ReservePlan, limits: tuple[Limit, ...]) -> tuple[LimitStatus, ...]:
        """Hits.CHECK's statuses: a limit with nothing left waits until it is fully reset."""
        peeked = await self._store.peek(
            plan.partition, plan.counted_as, plan.subject, limits, plan.slice_index
        )
        return tuple(
            s if s.remaining > 0 else replace(s, wait_us=max(s.wait_us or 0, s.reset_after_us, 1))
            for s in peeked
        )

    @staticmethod
    def _denial(
        tenant: str, tier: str, statuses: tuple[LimitStatus, ...], priority: Priority = Priority.NORMAL
    ) -> ReserveOutcome:
        # The binding limit is the one that can never fit, else the one that takes longest;
        # shadow limits never bind (they deny nothing).
        enforced = [i for i, s in enumerate(statuses) if not s.limit.shadow]
        never = [i for i in enforced if statuses[i].wait_us is None]
        if never:
            binding, reason, retry_after = never[0], DenyReason.EXCEEDS_CAPACITY, None
        else:
            binding = max(enforced, key=lambda i: statuses[i].wait_us or 0)
            retry_after = statuses[binding].wait_us
            calendar = statuses[binding].limit.algorithm is Algorithm.CALENDAR
            reason = DenyReason.BUDGET_EXHAUSTED if calendar else DenyReason.LIMIT_EXCEEDED
        marked = tuple(
            LimitStatus(s.limit, s.remaining, s.reset_after_us, s.wait_us, binding=i == binding)
            for i, s in enumerate(statuses)
        )
        return ReserveOutcome(
            decision=Decision.DENIED,
            tenant=tenant,
            tier=tier,
            limits=marked,
            deny_reason=reason,
            retry_after_us=retry_after,
            binding_limit=statuses[binding].limit.name,
            priority=priority,
        )

    async def commit(
        self,
        reservation_id: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        caller: Caller = ANONYMOUS,
        *,
        cache_write_input_tokens: int = 0,
    ) -> SettleOutcome:
        """Reconcile a reservation with the actual usage; idempotent. Only one of the caller's tenants'."""
        tenants = self.authorization().settle(caller)
        actual = _actual_usage(
            reservation_id, input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens
        )
        outcome = await self._store.settle(reservation_id, actual, self.policy.retention_us, tenants)
        await self._learn([outcome])
        return outcome

    async def _learn(self, outcomes: Sequence[SettleOutcome | QuotadError]) -> None:
        """Add first-time commits to their model's usage statistics (written in batches)."""
        samples = [
            UsageSample(
                o.model,
                o.tier,
                o.reserved.input_tokens,
                o.committed.input_tokens,
                o.reserved.output_tokens,
                o.committed.output_tokens,
                o.max_output_tokens,
            )
            for o in outcomes
            if isinstance(o, SettleOutcome) and not o.repeat and o.model
        ]
        if not samples:
            return
        windows = {name: model.learned_window for name, model in self.policy.models.items()}
        await self._recorder.add(samples, windows)

    async def flush(self) -> None:
        """Write pending usage statistics (on shutdown)."""
        await self._recorder.flush()

    async def commit_many(
        self,
        commits: Sequence[tuple[str, int, int, int] | tuple[str, int, int, int, int]],
        caller: Caller = ANONYMOUS,
    ) -> list[SettleOutcome | QuotadError]:
        """Commit each (reservation id, input, output, cached input[, cache-write input] tokens) on its
        own, in one round trip."""
        tenants = self.authorization().settle(caller)
        valid: list[tuple[str, Cost]] = []
        checked: list[QuotadError | None] = []
        for commit in commits:
            try:
                actual = _actual_usage(*commit)
            except InvalidRequest as error:
                checked.append(error)
                continue
            checked.append(None)
            valid.append((commit[0], actual))
        settled = iter(await self._store.commit_many(valid, self.policy.retention_us, tenants))
        outcomes = [error if error is not None else next(settled) for error in checked]
        await self._learn(outcomes)
        return outcomes

    async def accuracy(self, model: str, tier: str, caller: Caller = ANONYMOUS) -> AccuracyReport:
        """How far estimates were from actual usage for `model` (and `tier`, or every tier)."""
        self.authorization().accuracy(caller)
        violations: list[FieldViolation] = []
        _check_text(violations, "model", model, required=True)
        if tier and tier not in self.policy.tier_limits:
            violations.append(FieldViolation("tier", f"unknown tier {tier!r}"))
        if violations:
            raise InvalidRequest(violations)
        tiers = [tier] if tier else sorted(self.policy.tier_limits)
        stats = merge([await self._store.read_usage_stats(model, t) for t in tiers])
        settings = self.policy.models.get(model)
        learned = None
        if settings is not None and settings.learned:
            learned = output_quantile(stats, settings.learned_quantile, settings.learned_min_samples)
        return AccuracyReport(
            model=model,
            tier=tier,
            commits=stats.get("n", 0),
            input_ratio=(ratio_quantile(stats, "ri:", 0.5), ratio_quantile(stats, "ri:", 0.95)),
            output_ratio=(ratio_quantile(stats, "ro:", 0.5), ratio_quantile(stats, "ro:", 0.95)),
            estimated_tokens=stats.get("ei", 0) + stats.get("eo", 0),
            actual_tokens=stats.get("ai", 0) + stats.get("ao", 0),
            refunded_tokens=stats.get("rf", 0),
            overrun_tokens=stats.get("ov", 0),
            learning=bool(settings and settings.learned),
            learned_output_tokens=learned,
            input_overrun_tokens=stats.get("ovi", 0),
            output_overrun_tokens=stats.get("ovo", 0),
            input_overrun_commits=stats.get("nvi", 0),
            output_overrun_commits=stats.get("nvo", 0),
            unreserved_output_commits=stats.get("nz", 0),
        )

    async def release(self, reservation_id: str, caller: Caller = ANONYMOUS) -> SettleOutcome:
        """Refund a whole reservation (the call never happened); idempotent. Only one of the caller's tenants'."""
        tenants = self.authorization().settle(caller)
        if not reservation_id:
            raise InvalidRequest([FieldViolation("reservation_id", "required")])
        return await self._store.settle(reservation_id, None, self.policy.retention_us, tenants)

    async def get_usage(
        self, subject: str, tenant: str, tier: str, model: str, caller: Caller = ANONYMOUS
    ) -> UsageReport:
        """The status of every limit that applies to a subject of one of the caller's tenants, changing nothing."""
        violations: list[FieldViolation] = []
        _check_text(violations, "tenant", tenant, required=False)
        if violations:
            raise InvalidRequest(violations)
        tenant, counted_as = self.authorization().read(caller, tenant)
        _, tier = self._resolve_caller(violations, subject, tenant, tier, model, need_model=False)
        if violations:
            raise InvalidRequest(violations)
        limits = self.policy.limits_for(tier, counted_as, model)
        partition = self.policy.partition(counted_as, subject)
        statuses = await self._store.peek(partition, counted_as, subject, limits, _slice_index(partition))
        if self.policy.escrow is not None and any(limit.slices for limit in limits):
            statuses = await self._whole_limits(counted_as, subject, statuses, _slice_index(partition))
        return UsageReport(tenant=tenant, tier=tier, limits=statuses)

    async def _whole_limits(
        self, counted_as: str, subject: str, statuses: tuple[LimitStatus, ...], own: int
    ) -> tuple[LimitStatus, ...]:
        """`statuses` (of partition `own`) with each limit held in escrow reported whole: what is
        left in all its slices, and when the last of them resets. One read per other partition,
        each on its own slot: a report, not a snapshot (no script spans slots)."""
        assert self.policy.escrow is not None
        sliced = tuple(status.limit for status in statuses if status.limit.slices)
        names = self.policy.escrow.partition_names()
        others = await asyncio.gather(
            *(
                self._store.peek(name, counted_as, subject, sliced, index)
                for index, name in enumerate(names)
                if index != own
            )
        )
        whole, at = [], 0
        for status in statuses:
            if not status.limit.slices:
                whole.append(status)
                continue
            remaining = status.remaining + sum(report[at].remaining for report in others)
            reset_after = max([status.reset_after_us, *(report[at].reset_after_us for report in others)])
            whole.append(replace(status, remaining=remaining, reset_after_us=reset_after))
            at += 1
        return tuple(whole)
