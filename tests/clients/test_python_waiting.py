"""The Python client's server-side waits (`server_wait`) against the live quotad the other clients use.

Its policy (tests/conformance/policy.yaml) has a tier "wait" with one limit: one reservation at a
time. One reservation holds the slot, so the next waits in quotad's line; the tests free the slot
once that request has a place in the line (read from quotad's Redis), so no step depends on how
fast the machine is. The TypeScript, Go and Java suites test their clients the same way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from quotad import QuotaClient, SyncQuotaClient, Unavailable, pb
from quotad._common import DEFAULT_TIMEOUT_S, Attempts, Settings
from quotad_server.store.embedded import free_port

from tests.clients.conftest import LiveQuotad

TIER = "wait"
MODEL = "gpt-4o"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def waited_s(response: pb.CheckAndReserveResponse) -> float:
    return response.waited.ToTimedelta().total_seconds()


@pytest.fixture
async def redis_client(conformance_quotad: LiveQuotad) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(conformance_quotad.redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def channel(conformance_quotad: LiveQuotad) -> AsyncIterator[grpc.aio.Channel]:
    """One channel to the live quotad, connected before any deadline starts."""
    async with grpc.aio.insecure_channel(conformance_quotad.address) as opened:
        await asyncio.wait_for(opened.channel_ready(), 30)
        yield opened


@pytest.fixture
def helper(conformance_quotad: LiveQuotad, channel: grpc.aio.Channel) -> QuotaClient:
    """Holds and frees the slot, with all the time a loaded machine may need."""
    return QuotaClient(conformance_quotad.address, timeout=30, channel=channel)


async def places_in_line(redis_client: aioredis.Redis, subject: str) -> int:
    """Places taken in the waiting lines of `subject`'s limits (each a sorted set, key + ':q')."""
    lines = await redis_client.keys(f"*:{subject}:*:q")
    return sum([await redis_client.zcard(line) for line in lines])


async def until_waiting_in_line(
    redis_client: aioredis.Redis, subject: str, call: asyncio.Future[Any]
) -> None:
    """Until a request of `subject` has a place in a waiting line; fail if `call` ends first."""
    give_up = time.monotonic() + 30
    while await places_in_line(redis_client, subject) == 0:
        if call.done():
            pytest.fail(f"the waiting call ended before it waited in line: {call.result()!r}")
        assert time.monotonic() < give_up, "the call did not wait in line within 30 s"
        await asyncio.sleep(0.01)


async def hold_the_slot(helper: QuotaClient, subject: str) -> str:
    holder = await helper.check_and_reserve(subject, tier=TIER, model=MODEL, max_output_tokens=10)
    assert holder.decision == pb.DECISION_ALLOWED, holder
    return holder.reservation_id


async def test_check_and_reserve_with_a_server_wait_is_admitted_when_capacity_frees(
    conformance_quotad: LiveQuotad,
    channel: grpc.aio.Channel,
    helper: QuotaClient,
    redis_client: aioredis.Redis,
) -> None:
    quota = QuotaClient(conformance_quotad.address, channel=channel)  # the default deadline
    subject = unique("py-wait")
    holder = await hold_the_slot(helper, subject)

    waiting = asyncio.ensure_future(
        quota.check_and_reserve(
            subject,
            tier=TIER,
            model=MODEL,
            max_output_tokens=10,
            priority=pb.PRIORITY_HIGH,
            server_wait=timedelta(seconds=3),
        )
    )
    await until_waiting_in_line(redis_client, subject, waiting)
    await helper.release(holder)

    admitted = await waiting
    assert admitted.decision == pb.DECISION_ALLOWED, admitted
    assert waited_s(admitted) > 0
    assert admitted.priority == pb.PRIORITY_HIGH
    await helper.release(admitted.reservation_id)


async def test_reserve_takes_a_server_wait(
    conformance_quotad: LiveQuotad,
    channel: grpc.aio.Channel,
    helper: QuotaClient,
    redis_client: aioredis.Redis,
) -> None:
    quota = QuotaClient(conformance_quotad.address, channel=channel)
    subject = unique("py-reserve-wait")
    holder = await hold_the_slot(helper, subject)

    async def reserve_and_release() -> pb.CheckAndReserveResponse:
        async with quota.reserve(
            subject, tier=TIER, model=MODEL, max_output_tokens=10, server_wait=timedelta(seconds=3)
        ) as held:
            await held.release()
            return held.response

    waiting = asyncio.ensure_future(reserve_and_release())
    await until_waiting_in_line(redis_client, subject, waiting)
    await helper.release(holder)

    admitted = await waiting
    assert admitted.decision == pb.DECISION_ALLOWED, admitted
    assert waited_s(admitted) > 0


def blocking_client(address: str) -> SyncQuotaClient:
    """A SyncQuotaClient with the default deadline, its channel connected first."""
    opened = grpc.insecure_channel(address)
    grpc.channel_ready_future(opened).result(timeout=30)
    return SyncQuotaClient(address, channel=opened)


async def test_a_server_wait_longer_than_the_default_deadline_is_not_cut_off(
    conformance_quotad: LiveQuotad, helper: QuotaClient, redis_client: aioredis.Redis
) -> None:
    """Capacity frees only after the default deadline (2 s) has passed: a call whose deadline were
    not lengthened by its 5 s server wait would fail DEADLINE_EXCEEDED before then. The blocking
    client's call, as the report that found the asyncio one cutting waits short made it."""
    quota = await asyncio.to_thread(blocking_client, conformance_quotad.address)
    subject = unique("py-long-wait")
    holder = await hold_the_slot(helper, subject)
    began = asyncio.get_running_loop().create_future()

    def reserve() -> pb.CheckAndReserveResponse:
        began.get_loop().call_soon_threadsafe(began.set_result, time.monotonic())
        return quota.check_and_reserve(
            subject, tier=TIER, model=MODEL, max_output_tokens=10, server_wait=timedelta(seconds=5)
        )

    try:
        waiting = asyncio.ensure_future(asyncio.to_thread(reserve))
        started: float = await began  # just before the call sets its deadline
        await until_waiting_in_line(redis_client, subject, waiting)
        while time.monotonic() < started + DEFAULT_TIMEOUT_S + 0.5:
            if waiting.done():
                pytest.fail(f"the waiting call ended after {time.monotonic() - started:.3f} s: {waiting!r}")
            await asyncio.sleep(0.02)
        await helper.release(holder)

        admitted = await waiting
        elapsed = time.monotonic() - started
        assert admitted.decision == pb.DECISION_ALLOWED, admitted
        assert waited_s(admitted) > 0
        assert elapsed > DEFAULT_TIMEOUT_S
        await helper.release(admitted.reservation_id)
    finally:
        quota.close()


class _Sent(grpc.aio.UnaryUnaryClientInterceptor):
    """Every attempt: when it was made, its gRPC timeout and the wait it asked for."""

    def __init__(self) -> None:
        self.attempts: list[tuple[float, float, float]] = []

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        assert details.timeout is not None, "every attempt has a deadline"
        wait_s = request.max_wait.ToTimedelta().total_seconds()
        self.attempts.append((time.monotonic(), details.timeout, wait_s))
        return await continuation(details, request)


async def test_retries_keep_the_deadline_of_timeout_plus_server_wait() -> None:
    """Against a port nothing listens on, every attempt is UNAVAILABLE: the call retries until its
    one deadline, the timeout plus the server wait, and each retry asks for what is left of it."""
    sent = _Sent()
    address = f"127.0.0.1:{free_port()}"
    async with grpc.aio.insecure_channel(address, interceptors=[sent]) as refused:
        quota = QuotaClient(address, timeout=1.0, channel=refused)
        before = time.monotonic()
        with pytest.raises(Unavailable):
            await quota.check_and_reserve(unique("py-refused"), server_wait=timedelta(seconds=1))
        ended = time.monotonic()

    assert len(sent.attempts) >= 2, sent.attempts
    (first_at, first_timeout, first_wait), *retries = sent.attempts
    deadline = first_at + first_timeout
    assert before + 2.0 - 1e-6 <= deadline <= first_at + 2.0 + 1e-6  # 1e-6: float sums of clock reads
    assert ended <= deadline + 1.0
    assert first_wait == 1.0
    previous = first_wait
    for at, timeout, wait_s in retries:
        assert abs(at + timeout - deadline) < 0.05, "every attempt has the call's one deadline"
        assert wait_s < 1.0
        assert wait_s <= previous
        previous = wait_s


def test_a_server_wait_lengthens_the_deadline_and_a_retry_asks_for_what_is_left() -> None:
    now = 100.0
    request = pb.CheckAndReserveRequest(subject="a")
    request.max_wait.FromTimedelta(timedelta(seconds=3))
    attempts = Attempts(Settings(timeout_s=2.0), 5.0, clock=lambda: now, wait_s=3.0)
    first, timeout = attempts.attempt(request)
    assert first is request  # the first attempt sends the call's request
    assert timeout == 5.0
    now += 1.25  # answered UNAVAILABLE after 1.25 s
    retry, timeout = attempts.attempt(request)
    assert timeout == 3.75
    assert retry.max_wait.ToTimedelta() == timedelta(seconds=1.75)
    assert retry.idempotency_key == request.idempotency_key
    assert request.max_wait.ToTimedelta() == timedelta(seconds=3)  # the call's request is unchanged
    now += 4  # past the wait: a last retry waits no more
    assert attempts.attempt(request)[0].max_wait.ToTimedelta() == timedelta(0)
    assert Settings(timeout_s=2.0).attempts(request).timeout() == pytest.approx(5.0, abs=0.1)
    assert Settings(timeout_s=2.0).attempts(pb.CommitRequest()).timeout() == pytest.approx(2.0, abs=0.1)
