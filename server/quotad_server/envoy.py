"""Envoy's rate limit service (envoy.service.ratelimit.v3.RateLimitService) over the same core.

The servicer translates: the policy's `envoy.domains` say which descriptor entry keys name the
tenant, subject, tier, model and priority; the descriptors of one ShouldRateLimit become one
quotad request, decided all or nothing across every limit that applies (QuotaCore.decide_hits).
The answer gives one status per descriptor, for the limits of the scope the descriptor speaks
for. Nothing is decided here. docs/envoy.md is the user's reference for all of it.

The messages are the upstream ones, as the gRPC team publishes them generated (xds-protos);
see docs/envoy.md for what that package costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from quotad_server.api import (
    LOG_FIELD_BYTES,
    QuotaServicer,
    RpcObserver,
    Undecodable,
    _clip,
    _decoded,
    _put_us,
    shadow_denials,
)
from quotad_server.auth import Authenticator, Caller
from quotad_server.core import MAX_TOKENS, Hits, QuotaCore, ReserveRequest
from quotad_server.errors import FieldViolation, InvalidRequest, StoreUnavailable
from quotad_server.model import Decision, LimitStatus, Priority, ReserveOutcome, Scope
from quotad_server.policy import EnvoyDomain, Policy

SERVICE = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"]
Code = rls_pb2.RateLimitResponse.Code
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit
UINT32_MAX = 2**32 - 1
_SECOND = 1_000_000
# Envoy's units, longest first. MONTH and YEAR are calendar units: a 30-day or 365-day window is
# reported as days (see _unit), a calendar month budget as MONTH.
_UNITS = ((Unit.WEEK, 7 * 86_400 * _SECOND), (Unit.DAY, 86_400 * _SECOND), (Unit.HOUR, 3_600 * _SECOND),
          (Unit.MINUTE, 60 * _SECOND), (Unit.SECOND, _SECOND))  # fmt: skip
_PRIORITIES = {priority.value: priority for priority in Priority}


@dataclass(frozen=True, slots=True)
class Translated:
    """One ShouldRateLimit as the core's request: what it asks, how, and which descriptors it maps."""

    request: ReserveRequest | None  # None: no descriptor names anything the domain maps
    hits: Hits
    scopes: tuple[Scope | None, ...]  # per descriptor, the scope it speaks for; None: unmatched


def _scope_of(roles: set[str]) -> Scope:
    """The scope a descriptor speaks for: its subject's (a subject or a tier names one), else
    its tenant's, else everybody's."""
    if "subject" in roles or "tier" in roles:
        return Scope.SUBJECT
    if "tenant" in roles:
        return Scope.TENANT
    return Scope.GLOBAL


def _hits_of(descriptor: ratelimit_pb2.RateLimitDescriptor, request_hits: int) -> int:
    """A descriptor's hits: its own hits_addend if set, else the request's (0 there means 1)."""
    if descriptor.HasField("hits_addend"):
        return int(descriptor.hits_addend.value)
    return request_hits or 1


def _read_descriptors(
    domain: EnvoyDomain, request: rls_pb2.RateLimitRequest, violations: list[FieldViolation]
) -> tuple[dict[str, tuple[str, str]], list[Scope | None], int]:
    """Per role, the value the descriptors give it and where it was read; per descriptor, the
    scope it speaks for (None: it maps nothing); and the hits of the mapped descriptors (the largest)."""
    roles_by_key = {key: role for role, key in domain.keys.items()}
    values: dict[str, tuple[str, str]] = {}
    scopes: list[Scope | None] = []
    hits = 0
    for i, descriptor in enumerate(request.descriptors):
        roles: set[str] = set()
        for j, entry in enumerate(descriptor.entries):
            role = roles_by_key.get(entry.key)
            if role is None:
                continue
            roles.add(role)
            where = f"descriptors[{i}].entries[{j}]"
            seen = values.setdefault(role, (entry.value, where))
            if seen[0] != entry.value:
                violations.append(
                    FieldViolation(
                        f"{where}.value",
                        f"{entry.key} is {entry.value!r} here but {seen[0]!r} in {seen[1]}:"
                        f" one request has one {role}",
                    )
                )
        scopes.append(_scope_of(roles) if roles else None)
        if roles:
            hits = max(hits, _hits_of(descriptor, request.hits_addend))
    return values, scopes, hits


def translate(
    policy: Policy, request: rls_pb2.RateLimitRequest, caller: Caller, time_left_s: float | None
) -> Translated:
    """The core's request for a ShouldRateLimit; InvalidRequest naming the fields otherwise."""
    domains = policy.envoy.domains if policy.envoy is not None else {}
    domain: EnvoyDomain | None = domains.get(request.domain)
    if domain is None:
        known = ", ".join(sorted(domains)) or "none (the policy has no envoy section)"
        raise InvalidRequest(
            [
                FieldViolation(
                    "domain", f"unknown domain {request.domain!r}; the policy's envoy.domains: {known}"
                )
            ]
        )
    violations: list[FieldViolation] = []
    values, scopes, hits = _read_descriptors(domain, request, violations)
    if not values and not violations:  # nothing mapped: like envoy's ratelimit, nothing applies
        return Translated(None, Hits.CHECK, tuple(scopes))
    subject = values["subject"][0] if "subject" in values else domain.default_subject
    if subject is None:
        violations.append(
            FieldViolation("descriptors", f"no descriptor has the subject's entry {domain.keys['subject']!r}")
        )
    priority = None
    if "priority" in values:
        value, where = values["priority"]
        priority = _PRIORITIES.get(value)
        if priority is None:
            violations.append(FieldViolation(f"{where}.value", f"priority {value!r}: low, normal or high"))
    if domain.hits == "requests" and hits > 1:
        violations.append(
            FieldViolation(
                "hits_addend",
                f"domain {request.domain!r} counts requests: one call is one request (hits_addend 0"
                f" checks, 1 charges it), got {hits}",
            )
        )
    if domain.hits == "tokens" and hits > MAX_TOKENS:
        violations.append(FieldViolation("hits_addend", f"at most {MAX_TOKENS} tokens, got {hits}"))
    if violations:
        raise InvalidRequest(violations)
    assert subject is not None
    how = Hits.CHECK if hits == 0 else Hits.RESERVE if domain.hits == "requests" else Hits.CHARGE
    core_request = ReserveRequest(
        subject=subject,
        tenant=values.get("tenant", ("", ""))[0],
        tier=values["tier"][0] if "tier" in values else domain.default_tier or "",
        model=values.get("model", ("", ""))[0],
        input_tokens=hits if domain.hits == "tokens" else 0,
        priority=priority,
        time_left_s=time_left_s,
        caller=caller,
    )
    return Translated(core_request, how, tuple(scopes))


def _unit(period_us: int, limit: int, calendar: str | None) -> tuple[int, int]:
    """(requests_per_unit, unit) for a limit of `limit` per `period_us`: the period's own unit when
    it is one, else the longest unit within the period, with the rate scaled to it (rounded down:
    never more than the limit allows). Concurrency limits have no period: UNKNOWN."""
    if calendar == "day":
        return limit, Unit.DAY
    if calendar == "month":
        return limit, Unit.MONTH
    if period_us <= 0:
        return limit, Unit.UNKNOWN
    for unit, length in _UNITS:
        if period_us == length:
            return limit, unit
    for unit, length in _UNITS:
        if length <= period_us:
            return limit * length // period_us, unit
    return limit * _SECOND // period_us, Unit.SECOND  # under a second: the rate per second


def _tightest(statuses: Sequence[LimitStatus]) -> LimitStatus:
    """The status that speaks for a descriptor: a denying one (the longest wait; never fitting
    first), else the one with the smallest share left. Enforced limits speak before shadow ones,
    which only report (Envoy's x-ratelimit headers describe what is enforced)."""
    enforced = [s for s in statuses if not s.limit.shadow] or list(statuses)
    denying = [s for s in enforced if s.denied and not s.limit.shadow]
    if denying:
        return max(denying, key=lambda s: math.inf if s.wait_us is None else s.wait_us)
    return min(enforced, key=lambda s: s.remaining / s.limit.limit)


def _put_status(into: rls_pb2.RateLimitResponse.DescriptorStatus, status: LimitStatus) -> bool:
    """One descriptor's status; True when it is over its limit (enforced limits only)."""
    limit = status.limit
    over = status.denied and not limit.shadow
    into.code = Code.OVER_LIMIT if over else Code.OK
    per_unit, unit = _unit(limit.period_us, limit.limit, limit.calendar.value if limit.calendar else None)
    into.current_limit.name = limit.name
    into.current_limit.requests_per_unit = min(per_unit, UINT32_MAX)
    into.current_limit.unit = unit
    into.limit_remaining = min(max(status.remaining, 0), UINT32_MAX)
    # Denied: the time until this cost fits (Envoy's Retry-After takes the longest of these);
    # else the time until the limit is fully replenished.
    if over and status.wait_us is not None:
        _put_us(into.duration_until_reset, status.wait_us)
    else:
        _put_us(into.duration_until_reset, status.reset_after_us)
    return over


def fill_response(
    response: rls_pb2.RateLimitResponse, outcome: ReserveOutcome, translated: Translated
) -> None:
    """The overall code, one status per descriptor, and retry-after when over the limit."""
    over_any = outcome.decision is Decision.DENIED
    for scope in translated.scopes:
        into = response.statuses.add()
        statuses = [s for s in outcome.limits if s.limit.scope is scope] if scope is not None else []
        if statuses:
            over_any = _put_status(into, _tightest(statuses)) or over_any
        else:
            into.code = Code.OK  # no limit of its scope applies (or the descriptor maps nothing)
    response.overall_code = Code.OVER_LIMIT if over_any else Code.OK
    if over_any:
        waits = [s.wait_us for s in outcome.limits if s.denied and not s.limit.shadow]
        known = [wait for wait in waits if wait is not None]
        if known:
            seconds = max(1, math.ceil(max(known) / _SECOND))
            response.response_headers_to_add.append(
                base_pb2.HeaderValue(key="retry-after", value=str(seconds))
            )


def _in_descriptor_terms(error: InvalidRequest, policy: Policy, domain: str) -> InvalidRequest:
    """The core's violations, whose fields are quotad.v1's (tier, model...), naming the descriptor
    entry each came from, so that a gateway's operator knows which rate limit action to fix."""
    keys = policy.envoy.domains[domain].keys if policy.envoy and domain in policy.envoy.domains else {}
    renamed = [
        FieldViolation(f"{v.field} (descriptor entry {keys[v.field]!r})", v.description)
        if v.field in keys
        else v
        for v in error.violations
    ]
    return InvalidRequest(renamed)


class RateLimitServicer:
    """envoy.service.ratelimit.v3.RateLimitService over a QuotaCore. Register it with `add_service`.

    It shares quotad.v1's edge (QuotaServicer): identity, the log line per RPC, the status codes
    and the metrics. A gateway is a caller like any other: the policy's `callers` apply.
    """

    def __init__(
        self, core: QuotaCore, observer: RpcObserver | None = None, authenticator: Authenticator | None = None
    ) -> None:
        self._core = core
        self._edge = QuotaServicer(core, observer, authenticator)

    async def ShouldRateLimit(
        self,
        request: rls_pb2.RateLimitRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> rls_pb2.RateLimitResponse:
        fields: dict[str, Any] = {}
        return await self._edge._handle(
            "ShouldRateLimit", context, fields, self._should_rate_limit(request, fields, context)
        )

    async def _should_rate_limit(
        self,
        request: rls_pb2.RateLimitRequest | Undecodable,
        fields: dict[str, Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> rls_pb2.RateLimitResponse:
        message = _decoded(request)
        fields["domain"] = _clip(message.domain, LOG_FIELD_BYTES)
        caller = self._edge._identify(context, fields)
        policy = self._core.policy
        translated = translate(policy, message, caller, context.time_remaining())
        response = rls_pb2.RateLimitResponse()
        if translated.request is None:
            for _ in translated.scopes:
                response.statuses.add().code = Code.OK
            response.overall_code = Code.OK
            fields["decision"] = "unmatched"
            return response
        fields.update(
            subject=_clip(translated.request.subject, LOG_FIELD_BYTES),
            tenant=_clip(translated.request.tenant, LOG_FIELD_BYTES),
            hits=translated.hits.value,
        )
        try:
            outcome = await self._core.decide_hits(translated.request, translated.hits)
        except InvalidRequest as error:
            raise _in_descriptor_terms(error, policy, message.domain) from None
        except StoreUnavailable as error:
            answer = policy.envoy.store_unavailable if policy.envoy is not None else "unavailable"
            if answer == "unavailable":
                raise
            fields.update(store_unavailable=str(error), decision=answer)
            response.overall_code = Code.OK if answer == "ok" else Code.OVER_LIMIT
            for _ in translated.scopes:
                response.statuses.add().code = response.overall_code
            return response
        fill_response(response, outcome, translated)
        fields.update(tenant=outcome.tenant, tier=outcome.tier, decision=outcome.decision.value)
        if outcome.binding_limit:
            fields["binding_limit"] = outcome.binding_limit
        if shadow := shadow_denials(outcome):
            fields["shadow_denied"] = shadow
        fields["overall_code"] = Code.Name(response.overall_code)
        return response
