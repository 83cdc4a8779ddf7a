"""Who may ask for what: the policy's callers, identified by bearer tokens here (tests/e2e/test_tls.py
does the same over mutual TLS), and every escalation a caller could try, refused.

Each refusal is PERMISSION_DENIED (UNAUTHENTICATED without an identity) with a reason about the
caller's own request only, changes nothing, is counted and writes one audit line.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from quotad.v1 import quota_pb2 as pb
from quotad_server.auth import hash_token
from quotad_server.metrics import Metrics
from quotad_server.policy import PolicyError, parse_policy

from tests.conftest import Quotad, rpc_error, running_quotad, snapshot

POLICY = """
    defaults: {tenant: default, tier: free}
    unknown_tenants: UNKNOWN
    tiers:
      free: {limits: [{name: tokens, metric: total_tokens, limit: 1000, period: 1m}]}
      premium: {limits: [{name: tokens, metric: total_tokens, limit: 100000, period: 1m}]}
    tenants:
      alpha: {limits: []}
      beta: {limits: []}
      "*": {limits: [{name: tenant-rpm, metric: requests, limit: 2, period: 1m}]}
    callers:
      team-alpha:
        tenants: {alpha: {tier: free}}
      team-beta:
        tenants: {beta: {tiers: [free, premium]}}
      "rotator-*":
        tenants: {"*": {}}
      ops:
        tenants: {"*": {}}
        methods: [read, accuracy]
"""
TOKENS = {
    "team-alpha": "alpha-secret",
    "team-beta": "beta-secret",
    "rotator-1": "rot-secret",
    "ops": "ops-secret",
}


def bearer(identity: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[identity]}"),)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("".join(f"{identity} {hash_token(token)}\n" for identity, token in TOKENS.items()))
    return path


@pytest.fixture
async def authorized(
    redis_url: str, redis_client: aioredis.Redis, tokens_file: Path
) -> AsyncIterator[tuple[Quotad, Metrics]]:
    metrics = Metrics()
    policy = POLICY.replace("UNKNOWN", "shared")
    async with running_quotad(policy, redis_url, tokens_file=tokens_file, metrics=metrics) as q:
        yield q, metrics


async def reserve(q: Quotad, identity: str | None, **fields: Any) -> pb.CheckAndReserveResponse:
    request = pb.CheckAndReserveRequest(**{"subject": "alice", "input_tokens": 100, **fields})
    metadata = bearer(identity) if identity else ()
    return await q.stub.CheckAndReserve(request, metadata=metadata, timeout=5)


def refusals(metrics: Metrics, method: str, code: str) -> float:
    return metrics.registry.get_sample_value("quotad_refusals_total", {"method": method, "code": code}) or 0.0


async def test_without_an_identity_nothing_is_answered(authorized: tuple[Quotad, Metrics]) -> None:
    q, metrics = authorized
    error = await rpc_error(reserve(q, None))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    bad = await rpc_error(
        q.stub.CheckAndReserve(
            pb.CheckAndReserveRequest(subject="a"), metadata=(("authorization", "Bearer nope"),), timeout=5
        )
    )
    assert bad.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not known" in (bad.details() or "")
    assert refusals(metrics, "CheckAndReserve", "UNAUTHENTICATED") == 2


async def test_a_caller_cannot_pick_a_better_tier(
    authorized: tuple[Quotad, Metrics], redis_client: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's escalation: 800 tokens fit premium, not free; team-alpha's tier is fixed to free."""
    q, metrics = authorized
    before = await snapshot(redis_client)
    error = await rpc_error(reserve(q, "team-alpha", tier="premium", input_tokens=800, max_output_tokens=300))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "tier 'premium'" in (error.details() or "")
    assert await snapshot(redis_client) == before  # nothing changed
    assert refusals(metrics, "CheckAndReserve", "PERMISSION_DENIED") == 1
    audit = [
        line for line in capsys.readouterr().out.splitlines() if "refused" in line and "team-alpha" in line
    ]
    assert len(audit) == 1, audit

    fixed = await reserve(q, "team-alpha", input_tokens=800, max_output_tokens=300)
    assert fixed.tenant == "alpha"  # its one tenant is its default
    assert fixed.tier == "free"
    assert fixed.deny_reason == pb.DENY_REASON_EXCEEDS_CAPACITY  # 1100 > free's 1000

    chosen = await reserve(q, "team-beta", tier="premium", input_tokens=800, max_output_tokens=300)
    assert chosen.decision == pb.DECISION_ALLOWED
    assert chosen.tier == "premium"
    assert (await reserve(q, "team-beta")).tier == "free"  # the first it may choose
    error = await rpc_error(reserve(q, "team-beta", tier="gold"))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_caller_cannot_act_for_another_tenant(
    authorized: tuple[Quotad, Metrics], redis_client: aioredis.Redis
) -> None:
    q, _ = authorized
    theirs = await reserve(q, "team-beta", tenant="beta")
    assert theirs.decision == pb.DECISION_ALLOWED
    before = await snapshot(redis_client)

    for call in (
        reserve(q, "team-alpha", tenant="beta"),
        q.stub.Commit(
            pb.CommitRequest(reservation_id=theirs.reservation_id, input_tokens=1),
            metadata=bearer("team-alpha"),
            timeout=5,
        ),
        q.stub.Release(
            pb.ReleaseRequest(reservation_id=theirs.reservation_id), metadata=bearer("team-alpha"), timeout=5
        ),
        q.stub.GetUsage(
            pb.GetUsageRequest(subject="alice", tenant="beta"), metadata=bearer("team-alpha"), timeout=5
        ),
    ):
        error = await rpc_error(call)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, error
        assert "100" not in (error.details() or "")  # nothing of the reservation is read out
    assert await snapshot(redis_client) == before

    committed = await q.stub.Commit(
        pb.CommitRequest(reservation_id=theirs.reservation_id, input_tokens=50),
        metadata=bearer("team-beta"),
        timeout=5,
    )
    assert committed.committed.input_tokens == 50  # its owner settles it as usual


async def test_batches_and_streams_refuse_item_by_item(authorized: tuple[Quotad, Metrics]) -> None:
    q, metrics = authorized
    mine = pb.CheckAndReserveRequest(subject="a", tenant="alpha", input_tokens=1)
    theirs = pb.CheckAndReserveRequest(subject="a", tenant="beta", input_tokens=1)
    batch = await q.stub.CheckAndReserveBatch(
        pb.CheckAndReserveBatchRequest(requests=[mine, theirs]), metadata=bearer("team-alpha"), timeout=5
    )
    assert batch.results[0].response.decision == pb.DECISION_ALLOWED
    assert batch.results[1].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]

    async def items() -> AsyncIterator[pb.CheckAndReserveStreamRequest]:
        yield pb.CheckAndReserveStreamRequest(request_id="1", request=theirs)
        yield pb.CheckAndReserveStreamRequest(request_id="2", request=mine)

    answers = [
        a async for a in q.stub.CheckAndReserveStream(items(), metadata=bearer("team-alpha"), timeout=5)
    ]
    assert answers[0].result.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert answers[1].result.response.decision == pb.DECISION_ALLOWED
    assert refusals(metrics, "CheckAndReserveBatch", "PERMISSION_DENIED") == 1
    assert refusals(metrics, "CheckAndReserveStream", "PERMISSION_DENIED") == 1


async def test_methods_are_granted_per_caller(authorized: tuple[Quotad, Metrics]) -> None:
    q, _ = authorized
    error = await rpc_error(reserve(q, "ops", tenant="alpha"))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    usage = await q.stub.GetUsage(
        pb.GetUsageRequest(subject="alice", tenant="beta"), metadata=bearer("ops"), timeout=5
    )
    assert usage.tenant == "beta"
    await q.stub.GetAccuracy(pb.GetAccuracyRequest(model="gpt-4o"), metadata=bearer("ops"), timeout=5)
    error = await rpc_error(
        q.stub.GetAccuracy(pb.GetAccuracyRequest(model="gpt-4o"), metadata=bearer("team-alpha"), timeout=5)
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_rotating_tenant_names_escapes_no_cap(authorized: tuple[Quotad, Metrics]) -> None:
    """unknown_tenants: shared: every tenant the policy does not name shares one tenant-rpm of 2."""
    q, _ = authorized
    first = await reserve(q, "rotator-1", tenant="t-1")
    second = await reserve(q, "rotator-1", tenant="t-2")
    third = await reserve(q, "rotator-1", tenant="t-3")
    assert [first.decision, second.decision] == [pb.DECISION_ALLOWED] * 2
    assert first.tenant == "t-1"
    assert third.decision == pb.DECISION_DENIED
    assert third.binding_limit == "tenant-rpm"


async def test_unknown_tenants_can_be_refused(
    redis_url: str, redis_client: aioredis.Redis, tokens_file: Path
) -> None:
    policy = POLICY.replace("UNKNOWN", "refuse")
    async with running_quotad(policy, redis_url, tokens_file=tokens_file) as q:
        error = await rpc_error(reserve(q, "rotator-1", tenant="t-1"))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "not in the policy" in (error.details() or "")
        assert (await reserve(q, "rotator-1", tenant="alpha")).decision == pb.DECISION_ALLOWED


async def test_a_changed_tokens_file_is_read_again(
    authorized: tuple[Quotad, Metrics], tokens_file: Path
) -> None:
    q, _ = authorized
    assert (await reserve(q, "team-alpha")).decision == pb.DECISION_ALLOWED
    await asyncio.to_thread(tokens_file.write_text, f"team-alpha {hash_token('rotated')}\n")
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # read again within a second
        code = grpc.StatusCode.OK
        try:
            await reserve(q, "team-alpha")
        except grpc.aio.AioRpcError as error:
            code = error.code()
        if code is not grpc.StatusCode.OK:
            assert code is grpc.StatusCode.UNAUTHENTICATED
            break
        assert asyncio.get_running_loop().time() < deadline, "the old token still works"
        await asyncio.sleep(0.1)
    request = pb.CheckAndReserveRequest(subject="alice", input_tokens=1)
    allowed = await q.stub.CheckAndReserve(
        request, metadata=(("authorization", "Bearer rotated"),), timeout=5
    )
    assert allowed.decision == pb.DECISION_ALLOWED


def test_the_policy_checks_its_callers() -> None:
    bad_tier = textwrap.dedent(
        POLICY.replace("UNKNOWN", "own").replace("tiers: [free, premium]", "tiers: [gold]")
    )
    with pytest.raises(PolicyError, match="tier 'gold' is not one of the tiers"):
        parse_policy(bad_tier, "p.yaml")
    refused = textwrap.dedent(POLICY.replace("UNKNOWN", "refuse").replace("alpha: {tier: free}", "gamma: {}"))
    with pytest.raises(PolicyError, match="'gamma' is refused"):
        parse_policy(refused, "p.yaml")
