"""Error statuses carry AIP-193 details over a real gRPC socket: a google.rpc.ErrorInfo with a stable
reason and quotad's domain on every error, a google.rpc.RetryInfo on UNAVAILABLE; denials stay answers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from quotad.v1 import quota_pb2 as pb
from quotad_server.api import ERROR_DOMAIN
from quotad_server.store.embedded import EmbeddedRedis

from tests.conftest import QuotadFactory, rpc_error, running_quotad

POLICY = """
    defaults: {tier: free}
    models: {gpt-4o: {max_output_tokens: 50}}  # each call reserves its input + 50 output tokens
    tiers:
      free:
        limits:
          - {name: tpm, metric: total_tokens, limit: 1000, period: 1m}
"""


def details(error: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an aio error is a grpc.Call too
    assert status is not None, f"{error.code().name} carries no google.rpc.Status"
    return list(status.details)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    found = [d for d in details(error) if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(found) == 1, f"{error.code().name}: expected one ErrorInfo, got {details(error)}"
    info = error_details_pb2.ErrorInfo()
    found[0].Unpack(info)
    return info


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    found = [d for d in details(error) if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    if not found:
        return None
    info = error_details_pb2.RetryInfo()
    found[0].Unpack(info)
    return info


async def test_invalid_argument_names_its_reason_and_keeps_its_field_violations(
    quotad: QuotadFactory,
) -> None:
    async with quotad(POLICY) as q:
        error = await rpc_error(q.reserve(subject="alice", model="gpt-4o", input_tokens=-1))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(error)
    assert (info.reason, info.domain) == ("INVALID_REQUEST", ERROR_DOMAIN)
    assert any(d.Is(error_details_pb2.BadRequest.DESCRIPTOR) for d in details(error))
    assert retry_info(error) is None  # the same request fails the same way


async def test_not_found_and_failed_precondition_have_their_own_reasons(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q:
        missing = await rpc_error(q.commit("0" * 40, input_tokens=1, output_tokens=1))
        reserved = await q.reserve(subject="alice", model="gpt-4o", input_tokens=10)
        await q.release(reserved.reservation_id)
        settled = await rpc_error(q.commit(reserved.reservation_id, input_tokens=1, output_tokens=1))
        await q.reserve(subject="bob", model="gpt-4o", input_tokens=10, idempotency_key="k1")
        reused = await rpc_error(
            q.reserve(subject="bob", model="gpt-4o", input_tokens=11, idempotency_key="k1")
        )

    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(missing).reason == "RESERVATION_NOT_FOUND"
    assert settled.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(settled).reason == "RESERVATION_ALREADY_SETTLED"
    assert reused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(reused).reason == "IDEMPOTENCY_KEY_REUSED"
    for error in (missing, settled, reused):
        assert error_info(error).domain == ERROR_DOMAIN
        assert retry_info(error) is None


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, so pausing it leaves the session's alone."""
    with EmbeddedRedis() as server:
        yield server


async def test_unavailable_carries_retry_info_and_its_reason(own_redis: EmbeddedRedis) -> None:
    assert own_redis.process is not None
    async with running_quotad(POLICY, own_redis.url, timeout_s=0.25, subject="alice") as q:
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            error = await rpc_error(q.reserve(model="gpt-4o", input_tokens=10))
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(error)
    assert (info.reason, info.domain) == ("STORE_UNAVAILABLE", ERROR_DOMAIN)
    retry = retry_info(error)
    assert retry is not None, "UNAVAILABLE must say when to retry (google.rpc.RetryInfo)"
    assert retry.retry_delay.ToMilliseconds() == 100


async def test_a_denial_is_still_an_answer_with_retry_after_in_the_body(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q:
        await q.reserve(subject="carol", model="gpt-4o", input_tokens=900)
        denied = await q.reserve(subject="carol", model="gpt-4o", input_tokens=900)

    assert denied.decision == pb.DECISION_DENIED
    assert denied.deny_reason == pb.DENY_REASON_LIMIT_EXCEEDED
    assert denied.HasField("retry_after")
