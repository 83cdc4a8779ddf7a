"""Batched and streaming forms: each item decided on its own, in order, one failure never fails the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis
from quotad.v1 import quota_pb2 as pb

from tests.conftest import RPC_TIMEOUT_S, ManualClock, QuotadFactory, rpc_error

POLICY = """
    defaults: {tier: t}
    tiers:
      t:
        limits:
          - {name: tokens, metric: input_tokens, limit: 1000, period: 1d}
"""
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def reserve(subject: str, tokens: int) -> pb.CheckAndReserveRequest:
    return pb.CheckAndReserveRequest(subject=subject, input_tokens=tokens)


async def test_batch_decides_each_item_on_its_own(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        batch = pb.CheckAndReserveBatchRequest(
            requests=[
                reserve("alice", 600),
                reserve("", 10),  # invalid: no subject
                reserve("alice", 600),  # alice has 400 left: denied, nothing charged
                reserve("alice", 400),
                reserve("bob", 2000),  # never fits
                reserve("bob", -1),  # invalid
            ]
        )
        response = await q.stub.CheckAndReserveBatch(batch, timeout=RPC_TIMEOUT_S)

        outcomes = [r.WhichOneof("outcome") for r in response.results]
        assert outcomes == ["response", "error", "response", "response", "response", "error"]
        decisions = [r.response.decision for r in response.results if r.HasField("response")]
        # Items are decided concurrently; alice's two 600s race, so exactly one of them is admitted.
        assert sorted(decisions[:3]) == [pb.DECISION_ALLOWED, pb.DECISION_ALLOWED, pb.DECISION_DENIED]
        assert response.results[4].response.deny_reason == pb.DENY_REASON_EXCEEDS_CAPACITY
        assert response.results[1].error.code == INVALID
        assert [v.field for v in response.results[1].error.field_violations] == ["subject"]
        assert [v.field for v in response.results[5].error.field_violations] == ["input_tokens"]
        assert await q.usage(subject="alice") == {"tokens": 0}
        assert await q.usage(subject="bob") == {"tokens": 1000}


async def test_oversized_batch_is_refused_whole(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        batch = pb.CheckAndReserveBatchRequest(requests=[reserve("alice", 1)] * 1001)
        error = await rpc_error(q.stub.CheckAndReserveBatch(batch, timeout=RPC_TIMEOUT_S))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await q.usage(subject="alice") == {"tokens": 1000}


async def test_commit_batch_settles_each_item_on_its_own(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        first = await q.reserve(subject="alice", input_tokens=300)
        second = await q.reserve(subject="alice", input_tokens=300)
        batch = pb.CommitBatchRequest(
            requests=[
                pb.CommitRequest(reservation_id=first.reservation_id, input_tokens=100),
                pb.CommitRequest(reservation_id="0" * 40, input_tokens=1),
                pb.CommitRequest(reservation_id=second.reservation_id, input_tokens=-1),
                pb.CommitRequest(reservation_id=second.reservation_id, input_tokens=250),
            ]
        )
        response = await q.stub.CommitBatch(batch, timeout=RPC_TIMEOUT_S)

        assert [r.WhichOneof("outcome") for r in response.results] == [
            "response",
            "error",
            "error",
            "response",
        ]
        assert response.results[1].error.code == NOT_FOUND
        assert response.results[2].error.code == INVALID
        assert await q.usage(subject="alice") == {"tokens": 1000 - 100 - 250}


async def _requests(
    items: list[pb.CheckAndReserveStreamRequest],
) -> AsyncIterator[pb.CheckAndReserveStreamRequest]:
    for item in items:
        yield item
        await asyncio.sleep(0)


async def test_stream_answers_in_order_and_survives_bad_items(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        items = [
            pb.CheckAndReserveStreamRequest(
                request_id=f"r{i}", request=reserve("" if i == 3 else "alice", 100)
            )
            for i in range(12)
        ]
        answers = [a async for a in q.stub.CheckAndReserveStream(_requests(items), timeout=RPC_TIMEOUT_S)]

        assert [a.request_id for a in answers] == [f"r{i}" for i in range(12)]
        assert answers[3].result.error.code == INVALID
        decided = [a.result.response.decision for a in answers if a.result.HasField("response")]
        assert decided.count(pb.DECISION_ALLOWED) == 10
        assert decided.count(pb.DECISION_DENIED) == 1
        assert await q.usage(subject="alice") == {"tokens": 0}


async def test_commit_stream_settles_in_order(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock()) as q:
        reserved = [await q.reserve(subject="alice", input_tokens=100) for _ in range(5)]

        async def commits() -> AsyncIterator[pb.CommitStreamRequest]:
            for i, r in enumerate(reserved):
                yield pb.CommitStreamRequest(
                    request_id=str(i),
                    request=pb.CommitRequest(reservation_id=r.reservation_id, input_tokens=10),
                )

        answers = [a async for a in q.stub.CommitStream(commits(), timeout=RPC_TIMEOUT_S)]
        assert [a.request_id for a in answers] == ["0", "1", "2", "3", "4"]
        assert all(a.result.HasField("response") for a in answers)
        assert await q.usage(subject="alice") == {"tokens": 1000 - 50}


async def test_concurrent_batches_never_over_admit(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q:
        batches = [
            pb.CheckAndReserveBatchRequest(requests=[reserve("alice", 7 + (i + j) % 13) for j in range(16)])
            for i in range(20)
        ]
        responses = await asyncio.gather(
            *(q.stub.CheckAndReserveBatch(b, timeout=RPC_TIMEOUT_S) for b in batches)
        )
        admitted = sum(
            item.input_tokens
            for batch, response in zip(batches, responses, strict=True)
            for item, result in zip(batch.requests, response.results, strict=True)
            if result.response.decision == pb.DECISION_ALLOWED
        )
        assert 1000 - 19 <= admitted <= 1000


async def test_scripts_flushed_from_redis_are_sent_again(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    """A restarted or failed-over Redis has no scripts (NOSCRIPT): the call goes again as EVAL, once."""
    async with quotad(POLICY, clock=ManualClock()) as q:
        await redis_client.script_flush()
        assert (await q.reserve(subject="alice", input_tokens=100)).decision == pb.DECISION_ALLOWED
        await redis_client.script_flush()
        batch = pb.CheckAndReserveBatchRequest(requests=[reserve("alice", 100), reserve("bob", 100)])
        response = await q.stub.CheckAndReserveBatch(batch, timeout=RPC_TIMEOUT_S)
        assert [r.response.decision for r in response.results] == [pb.DECISION_ALLOWED] * 2
        await redis_client.script_flush()
        commit = await q.commit(response.results[1].response.reservation_id, input_tokens=50, output_tokens=0)
        assert commit.committed.input_tokens == 50
        assert await q.usage(subject="alice") == {"tokens": 800}  # each reserve counted once
        assert await q.usage(subject="bob") == {"tokens": 950}
