"""Envoy's rate limit service on quotad's port: descriptors -> one all-or-nothing decision, the
answer Envoy needs, hits_addend, shadow limits (here and on quotad.v1), bad input, callers and
what a gateway gets while Redis is down. Real Valkey, real gRPC, the upstream messages."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from quotad.v1 import quota_pb2 as pb
from quotad_server.auth import hash_token
from quotad_server.envoy import _unit
from quotad_server.metrics import Metrics
from quotad_server.policy import PolicyError, parse_policy
from quotad_server.store.embedded import EmbeddedRedis

from tests.conftest import START_US, ManualClock, Quotad, QuotadFactory, rpc_error, running_quotad, snapshot

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit

POLICY = """
    defaults: {tier: free}
    tiers:
      free:
        limits:
          - {name: user-rpm, metric: requests, limit: 3, period: 1m, algorithm: sliding_window}
          - {name: user-rps-new, metric: requests, limit: 1, period: 1m, algorithm: sliding_window, shadow: true}
          - {name: user-tpm, metric: total_tokens, limit: 1000, period: 1m}
          - {name: in-flight, metric: concurrent, limit: 1}
      pro:
        limits:
          - {name: user-rpm, metric: requests, limit: 100, period: 1m, algorithm: sliding_window}
    tenants:
      "*":
        limits:
          - {name: tenant-rpm, metric: requests, limit: 10, period: 1m, algorithm: sliding_window}
    envoy:
      domains:
        api:
          tenant: x-tenant
          subject: user_id
          tier: tier
          priority: priority
        llm-tokens:
          tenant: x-tenant
          subject: user_id
          hits: tokens
        tenant-only:
          tenant: x-tenant
          default_subject: "-"
"""


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> Any:
    message = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        message.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return message


class Envoy:
    """What Envoy's rate limit filter sends, on quotad's channel."""

    def __init__(self, q: Quotad, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.q = q
        self.stub = rls_pb2_grpc.RateLimitServiceStub(q.channel)
        self.metadata = metadata

    async def ask(self, domain: str, *descriptors: Any, hits_addend: int = 0) -> Any:
        request = rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits_addend)
        return await self.stub.ShouldRateLimit(request, metadata=self.metadata, timeout=5)


def user(name: str, tenant: str = "acme", **more: str) -> Any:
    return descriptor(("x-tenant", tenant), ("user_id", name), *more.items())


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        detail.Unpack(bad)
        found.update({v.field: v.description for v in bad.field_violations})
    return found


@pytest.fixture
async def q(quotad: QuotadFactory) -> AsyncIterator[Quotad]:
    async with quotad(POLICY, clock=ManualClock()) as running:
        yield running


async def test_served_on_quotads_port_with_health_and_reflection(q: Quotad) -> None:
    health: Any = health_pb2_grpc.HealthStub(q.channel)
    request = health_pb2.HealthCheckRequest(service="envoy.service.ratelimit.v3.RateLimitService")
    assert (await health.Check(request, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
    reflection: Any = reflection_pb2_grpc.ServerReflectionStub(q.channel)  # type: ignore[arg-type]  # typeshed: sync channels only
    asked = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in reflection.ServerReflectionInfo(iter([asked]), timeout=5):
        names = {service.name for service in answer.list_services_response.service}
        assert "envoy.service.ratelimit.v3.RateLimitService" in names


async def test_descriptors_become_one_decision_with_a_status_each(q: Quotad) -> None:
    envoy = Envoy(q)
    tenant = descriptor(("x-tenant", "acme"))
    for remaining in (2, 1, 0):
        response = await envoy.ask("api", tenant, user("alice"))
        assert response.overall_code == OK
        tenant_status, user_status = response.statuses
        assert tenant_status.code == OK
        assert tenant_status.current_limit.name == "tenant-rpm"
        assert tenant_status.current_limit.requests_per_unit == 10
        assert tenant_status.current_limit.unit == Unit.MINUTE
        assert user_status.current_limit.name == "user-rpm"  # the tightest enforced one of its scope
        assert user_status.limit_remaining == remaining
    assert len(response.response_headers_to_add) == 0

    denied = await envoy.ask("api", tenant, user("alice"))
    assert denied.overall_code == OVER
    assert [s.code for s in denied.statuses] == [OK, OVER]
    assert denied.statuses[1].duration_until_reset.seconds == 60  # until the oldest request leaves
    assert [(h.key, h.value) for h in denied.response_headers_to_add] == [("retry-after", "60")]
    usage = await q.usage(subject="alice", tenant="acme")
    assert usage["tenant-rpm"] == 7  # the denial charged nothing, anywhere
    assert usage["in-flight"] == 1  # concurrency limits are not Envoy's: no call would end the slot


async def test_one_descriptor_over_charges_none_of_the_others(
    q: Quotad, redis_client: aioredis.Redis
) -> None:
    envoy = Envoy(q)
    for name in ("bob", "carol", "dave"):
        for _ in range(3):
            await envoy.ask("api", user(name))
    before = await snapshot(redis_client)
    assert (await envoy.ask("api", user("bob"))).overall_code == OVER
    assert await snapshot(redis_client) == before
    assert (await q.usage(subject="bob", tenant="acme"))["tenant-rpm"] == 1


async def test_tier_and_priority_come_from_their_entries(q: Quotad) -> None:
    envoy = Envoy(q)
    response = await envoy.ask("api", user("erin", tier="pro", priority="high"))
    assert response.statuses[0].current_limit.requests_per_unit == 100
    error = await rpc_error(envoy.ask("api", user("erin", tier="gold")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown tier 'gold'" in violations(error)["tier (descriptor entry 'tier')"]


async def test_tokens_are_charged_after_the_response_and_checked_before(
    q: Quotad, redis_client: aioredis.Redis
) -> None:
    """Envoy AI Gateway: hits_addend 0 on the request's descriptor (a check), then the tokens used
    after the response. A request-level hits_addend of 0 means 1, as in Envoy."""
    envoy = Envoy(q)
    check = descriptor(("x-tenant", "acme"), ("user_id", "alice"), hits=0)
    before = await snapshot(redis_client)
    assert (await envoy.ask("llm-tokens", check)).overall_code == OK
    assert await snapshot(redis_client) == before  # a check charges nothing

    charged = await envoy.ask("llm-tokens", descriptor(("x-tenant", "acme"), ("user_id", "alice"), hits=900))
    assert charged.overall_code == OK
    assert charged.statuses[0].current_limit.name == "user-tpm"
    assert charged.statuses[0].limit_remaining == 100
    assert (await envoy.ask("llm-tokens", user("alice"), hits_addend=0)).statuses[0].limit_remaining == 99
    # The usage was spent: a charge over the limit is still charged (debt), and the answer says over.
    over = await envoy.ask("llm-tokens", user("alice"), hits_addend=300)
    assert over.overall_code == OVER
    assert over.statuses[0].limit_remaining == 0
    assert (await q.usage(subject="alice", tenant="acme"))["user-tpm"] == -201
    checked = await envoy.ask("llm-tokens", check)
    assert checked.overall_code == OVER
    assert checked.statuses[0].duration_until_reset.seconds > 0
    assert checked.response_headers_to_add[0].key == "retry-after"


async def test_descriptors_that_map_nothing_are_ok_and_decide_nothing(
    q: Quotad, redis_client: aioredis.Redis
) -> None:
    before = await snapshot(redis_client)
    response = await Envoy(q).ask("api", descriptor(("remote_address", "10.0.0.1")))
    assert response.overall_code == OK
    assert [s.code for s in response.statuses] == [OK]
    assert not response.statuses[0].HasField("current_limit")
    assert await snapshot(redis_client) == before


async def test_tenant_only_domain_uses_its_default_subject(q: Quotad) -> None:
    response = await Envoy(q).ask("tenant-only", descriptor(("x-tenant", "zeta")))
    assert response.overall_code == OK
    assert response.statuses[0].current_limit.name == "tenant-rpm"
    assert response.statuses[0].limit_remaining == 9


@pytest.mark.parametrize(
    ("domain", "descriptors", "hits_addend", "field", "says"),
    [
        ("nope", [user("a")], 0, "domain", "unknown domain 'nope'; the policy's envoy.domains: api,"),
        (
            "api",
            [descriptor(("x-tenant", "acme"))],
            0,
            "descriptors",
            "no descriptor has the subject's entry",
        ),
        ("api", [user("a"), user("b")], 0, "descriptors[1].entries[1].value", "one request has one subject"),
        ("api", [user("a")], 2, "hits_addend", "counts requests"),
        ("api", [user("a", priority="urgent")], 0, "descriptors[0].entries[2].value", "low, normal or high"),
        ("llm-tokens", [user("a")], 2_000_000_000, "hits_addend", "at most 1000000000 tokens"),
    ],
)
async def test_bad_input_is_invalid_argument_and_changes_nothing(
    q: Quotad,
    redis_client: aioredis.Redis,
    *,
    domain: str,
    descriptors: list[Any],
    hits_addend: int,
    field: str,
    says: str,
) -> None:
    before = await snapshot(redis_client)
    error = await rpc_error(Envoy(q).ask(domain, *descriptors, hits_addend=hits_addend))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in violations(error)[field]
    assert await snapshot(redis_client) == before


def test_policy_refuses_a_domain_without_a_subject() -> None:
    bad = POLICY.replace('default_subject: "-"', "hits: requests")
    with pytest.raises(PolicyError, match=r"envoy\.domains\.tenant-only: give subject"):
        parse_policy(textwrap.dedent(bad), "p.yaml")


@pytest.mark.parametrize(
    ("period_s", "limit", "expected"),
    [
        (60, 100, (100, Unit.MINUTE)),
        (1, 5, (5, Unit.SECOND)),
        (2, 10, (5, Unit.SECOND)),  # 10 per 2 s: 5 a second
        (90, 30, (20, Unit.MINUTE)),  # 30 per 90 s: 20 a minute, rounded down
        (86_400, 7, (7, Unit.DAY)),
    ],
)
def test_windows_map_to_the_closest_envoy_unit(period_s: int, limit: int, expected: tuple[int, int]) -> None:
    assert _unit(period_s * 1_000_000, limit, None) == expected
    assert _unit(0, 3, "month") == (3, Unit.MONTH)


# -- shadow limits ---------------------------------------------------------------------------


async def test_shadow_limit_never_denies_is_not_charged_when_over_and_is_reported(
    quotad: QuotadFactory,
) -> None:
    metrics = Metrics()
    async with quotad(POLICY, clock=ManualClock(), metrics=metrics, subject="sam", tenant="acme") as q:
        first = await q.reserve()
        await q.commit(first.reservation_id, 0, 0)  # frees the in-flight slot, keeps the request counted
        second = await q.reserve()
        assert first.decision == second.decision == pb.DECISION_ALLOWED
        shadow = {s.name: s for s in second.limits}["user-rps-new"]
        assert shadow.shadow
        assert shadow.denied
        assert not shadow.binding
        assert shadow.remaining == 0  # not charged when it would deny: the count enforcing would keep
        usage = await q.stub.GetUsage(pb.GetUsageRequest(subject="sam", tenant="acme"), timeout=5)
        shadows = [(s.name, s.remaining) for s in usage.limits if s.shadow]
        assert shadows == [("user-rps-new", 0)]
        await q.commit(second.reservation_id, 0, 0)
        await q.commit((await q.reserve()).reservation_id, 0, 0)
        fourth = await q.reserve()  # user-rpm is 3 a minute: denied
        assert fourth.decision == pb.DECISION_DENIED
        assert fourth.binding_limit == "user-rpm"  # a shadow limit never binds
        value = metrics.registry.get_sample_value(
            "quotad_shadow_denials_total", {"limit": "user-rps-new", "scope": "subject"}
        )
        assert value == 2  # the second and third admitted requests; a denied one is not counted


async def test_shadow_limit_through_envoy(q: Quotad) -> None:
    envoy = Envoy(q)
    assert (await envoy.ask("api", user("tom"))).overall_code == OK
    second = await envoy.ask("api", user("tom"))
    assert second.overall_code == OK  # the shadow limit of 1 would have denied it
    assert second.statuses[0].code == OK
    assert second.statuses[0].current_limit.name == "user-rpm"


# -- callers and outages ---------------------------------------------------------------------

CALLERS = """
    callers:
      gateway-acme:
        tenants: {acme: {tier: free}}
"""


async def test_a_gateway_is_a_caller_like_any_other(quotad: QuotadFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"gateway-acme {hash_token('gw-secret')}\n")
    async with quotad(POLICY + CALLERS, tokens_file=tokens) as q:
        gateway = Envoy(q, (("authorization", "Bearer gw-secret"),))
        assert (await gateway.ask("api", user("uma"))).overall_code == OK
        error = await rpc_error(gateway.ask("api", user("uma", tenant="globex")))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        error = await rpc_error(Envoy(q).ask("api", user("uma")))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("", grpc.StatusCode.UNAVAILABLE),
        ("store_unavailable: ok", OK),
        ("store_unavailable: over_limit", OVER),
    ],
)
async def test_what_a_gateway_gets_while_redis_is_down(
    own_redis: EmbeddedRedis, setting: str, expected: object
) -> None:
    policy = POLICY.replace("    envoy:\n", f"    envoy:\n      {setting}\n") if setting else POLICY
    async with running_quotad(policy, own_redis.url, timeout_s=0.25) as q:
        envoy = Envoy(q)
        assert (await envoy.ask("api", user("vic"))).overall_code == OK
        own_redis.stop()
        if expected is grpc.StatusCode.UNAVAILABLE:
            assert (await rpc_error(envoy.ask("api", user("vic")))).code() == expected
        else:
            response = await envoy.ask("api", descriptor(("x-tenant", "acme")), user("vic"))
            assert response.overall_code == expected
            assert [s.code for s in response.statuses] == [expected, expected]


async def test_concurrent_calls_admit_exactly_the_limit_and_charge_only_them(q: Quotad) -> None:
    envoy = Envoy(q)
    tenant = descriptor(("x-tenant", "acme"))
    answers = await asyncio.gather(*(envoy.ask("api", tenant, user("wendy")) for _ in range(40)))
    assert sum(a.overall_code == OK for a in answers) == 3  # user-rpm
    assert (await q.usage(subject="wendy", tenant="acme"))["tenant-rpm"] == 7  # only the admitted


SHADOW_TOKENS = """
    defaults: {tier: t}
    tiers:
      t:
        limits:
          - {name: tpm, metric: total_tokens, limit: 10000, period: 1m}
          - {name: tpm-new, metric: total_tokens, limit: 100, period: 1m, shadow: true}
          - {name: in-flight-new, metric: concurrent, limit: 1, shadow: true}
"""


async def test_a_shadow_limit_left_uncharged_stays_so_when_the_call_settles(quotad: QuotadFactory) -> None:
    async with quotad(SHADOW_TOKENS, clock=ManualClock(), subject="xena") as q:
        first = await q.reserve(input_tokens=60)
        second = await q.reserve(input_tokens=60)  # over tpm-new and in-flight-new: admitted, not charged
        assert second.decision == pb.DECISION_ALLOWED
        assert {s.name for s in second.limits if s.denied} == {"tpm-new", "in-flight-new"}
        assert await q.usage() == {"tpm": 9880, "tpm-new": 40, "in-flight-new": 0}
        await q.commit(second.reservation_id, input_tokens=500, output_tokens=0)  # far above its estimate
        assert await q.usage() == {"tpm": 9440, "tpm-new": 40, "in-flight-new": 0}
        await q.release(first.reservation_id)
        assert await q.usage() == {"tpm": 9500, "tpm-new": 100, "in-flight-new": 1}


WINDOW = """
    defaults: {tier: t}
    tiers: {t: {limits: [{name: per-2s, metric: requests, limit: 5, period: 2s, algorithm: sliding_window}]}}
    envoy: {domains: {api: {subject: user_id}}}
"""


async def test_exact_across_a_window_boundary(quotad: QuotadFactory) -> None:
    """On quotad's clock: 5 per 2 s admits 5 just before a 2 s boundary and none just after it
    (fixed windows would admit 5 more), then one per slot as each admission leaves the window."""
    clock = ManualClock(now_us=(START_US // 2_000_000 + 1) * 2_000_000 - 100_000)  # 0.1 s before a boundary
    async with quotad(WINDOW, clock=clock) as q:
        envoy = Envoy(q)
        ask = descriptor(("user_id", "yuri"))
        assert [(await envoy.ask("api", ask)).overall_code for _ in range(6)] == [OK] * 5 + [OVER]
        clock.advance(0.2)  # past the boundary
        denied = await envoy.ask("api", ask)
        assert denied.overall_code == OVER
        assert denied.statuses[0].duration_until_reset.ToMicroseconds() == 1_800_000  # exact retry-after
        clock.advance(1.8)  # the first admissions leave the window
        assert [(await envoy.ask("api", ask)).overall_code for _ in range(6)] == [OK] * 5 + [OVER]


async def test_hits_are_an_amount_not_a_prompt_the_model_must_hold(quotad: QuotadFactory) -> None:
    """A model's context window and maximum output bound CheckAndReserve's prompt and reply, not
    Envoy's hits: a gateway naming a model with a small window, or one with no known maximum
    output, is decided on its hits alone."""
    policy = """
        defaults: {tier: free}
        price_catalog: none
        models: {tiny: {context_window: 100}, unknown: {}}
        tiers:
          free:
            limits:
              - {name: user-tpm, metric: total_tokens, limit: 1000, period: 1m}
        envoy:
          domains:
            llm-tokens: {tenant: x-tenant, subject: user_id, model: model, hits: tokens}
    """
    async with quotad(policy, clock=ManualClock()) as q:
        envoy = Envoy(q)
        for model, hits in (("tiny", 400), ("unknown", 300)):
            answer = await envoy.ask("llm-tokens", user("alice", model=model), hits_addend=hits)
            assert answer.overall_code == OK, model
        assert (await q.usage(subject="alice", tenant="acme"))["user-tpm"] == 300
