"""`quotad serve` as a process: SIGTERM drains, a restart loses and double-counts nothing,
and a ConfigMap-style policy update reaches a running process (seen on its /metrics)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from quotad.v1 import quota_pb2 as pb
from quotad_server.store.embedded import EmbeddedRedis, free_port

from tests.configmap import ConfigMapVolume
from tests.e2e.quotad_process import NOT_SERVING, POLICY, QUOTAD, SERVING, Process
from tests.metrics_scrape import scrape, value


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


async def _exit_code(process: subprocess.Popen[bytes], within_s: float) -> int:
    deadline = time.monotonic() + within_s
    while process.poll() is None:
        assert time.monotonic() < deadline, f"no exit within {within_s} s"
        await asyncio.sleep(0.02)
    return process.returncode


async def test_sigterm_goes_not_serving_then_refuses_new_rpcs_and_finishes_in_flight_ones(
    tmp_path: Path, own_redis: EmbeddedRedis, policy_path: Path
) -> None:
    assert own_redis.process is not None
    drain_s = 1.5
    quotad = Process(
        tmp_path,
        own_redis.url,
        policy_path,
        QUOTAD_SHUTDOWN_DRAIN_MS=str(int(drain_s * 1000)),
        QUOTAD_SHUTDOWN_GRACE_S="10",
        QUOTAD_REDIS_TIMEOUT_MS="8000",  # the in-flight RPC below waits on a paused Redis
    )
    try:
        await quotad.wait_serving()
        # An RPC in flight: Redis is paused, so it waits inside the server.
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        in_flight = asyncio.ensure_future(
            quotad.stub.CheckAndReserve(pb.CheckAndReserveRequest(subject="alice"), timeout=30)
        )
        await asyncio.sleep(0.3)  # let it reach the server
        sent_at = time.monotonic()
        quotad.process.send_signal(signal.SIGTERM)

        # Draining: health says NOT_SERVING at once (the liveness name stays SERVING), yet the
        # server still answers new RPCs, so load balancers and clients can move away.
        while await quotad.status() != NOT_SERVING:
            assert time.monotonic() - sent_at < drain_s, "health did not flip during the drain"
            await asyncio.sleep(0.02)
        assert await quotad.status("quotad.v1.QuotaService") == NOT_SERVING
        assert await quotad.status("liveness") == SERVING

        # After the drain: new RPCs are refused.
        refused: grpc.StatusCode | None = None
        while refused is None:
            try:
                await quotad.status()
            except grpc.aio.AioRpcError as error:
                refused = error.code()
            assert time.monotonic() - sent_at < drain_s + 5, "new RPCs still accepted after the drain"
            await asyncio.sleep(0.05)
        # UNAVAILABLE once the server refuses; CANCELLED for a call that raced the moment it began to.
        assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert time.monotonic() - sent_at >= drain_s * 0.9
        assert quotad.process.poll() is None  # still waiting for the in-flight RPC

        # Redis answers again: the in-flight RPC completes, and only then does the process exit 0.
        os.kill(own_redis.process.pid, signal.SIGCONT)
        reply = await in_flight
        assert reply.decision == pb.DECISION_ALLOWED
        assert await _exit_code(quotad.process, 10) == 0
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
        await quotad.close()

    events = [line["event"] for line in quotad.lines()]
    assert events.index("stopping") < events.index("stopped")
    # The reservation made by the in-flight RPC really exists: Commit it on a fresh server.
    successor = Process(tmp_path, own_redis.url, policy_path)
    try:
        await successor.wait_serving()
        done = await successor.stub.Commit(
            pb.CommitRequest(reservation_id=reply.reservation_id, input_tokens=1), timeout=5
        )
        assert not done.repeat
    finally:
        await successor.close()


async def test_a_restart_mid_traffic_loses_and_double_counts_nothing(
    tmp_path: Path, own_redis: EmbeddedRedis, policy_path: Path
) -> None:
    """Server A takes traffic and is SIGTERMed in the middle of it; server B, on the same Redis,
    answers the retries (same idempotency keys) and every Commit. The counters must then hold
    exactly what was admitted, once: no reservation lost, none charged twice."""
    first = Process(tmp_path, own_redis.url, policy_path, QUOTAD_SHUTDOWN_GRACE_S="10")
    admitted: dict[str, tuple[str, int]] = {}  # idempotency key -> (reservation id, estimated tokens)
    failed: list[tuple[str, int]] = []  # (idempotency key, input tokens) of the calls A did not answer
    try:
        await first.wait_serving()

        async def client(number: int) -> None:
            for call in range(10_000):
                key, tokens = f"c{number}-{call}", 10 + (call % 7)
                request = pb.CheckAndReserveRequest(
                    subject=f"user-{number}", input_tokens=tokens, max_output_tokens=5, idempotency_key=key
                )
                try:
                    reply = await first.stub.CheckAndReserve(request, timeout=5)
                except grpc.aio.AioRpcError:
                    failed.append((key, tokens))
                    return  # A is gone; this client's next calls go to B
                assert reply.decision == pb.DECISION_ALLOWED
                admitted[key] = (reply.reservation_id, tokens + 5)
                if len(admitted) == 150:
                    busy.set()

        busy = asyncio.Event()
        clients = [asyncio.create_task(client(n)) for n in range(6)]
        await busy.wait()
        first.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*clients)
        assert await _exit_code(first.process, 15) == 0
    finally:
        await first.close()
    assert len(failed) == 6

    second = Process(tmp_path, own_redis.url, policy_path)
    try:
        await second.wait_serving()
        # Retries of what A never answered, and of a few that A did answer (the client could
        # have lost those replies): the same keys give the first reservation, never a second one.
        retried = [*failed, *((key, tokens - 5) for key, (_, tokens) in list(admitted.items())[:10])]
        for key, tokens in retried:
            subject = f"user-{key[1 : key.index('-')]}"
            reply = await second.stub.CheckAndReserve(
                pb.CheckAndReserveRequest(
                    subject=subject, input_tokens=tokens, max_output_tokens=5, idempotency_key=key
                ),
                timeout=5,
            )
            assert reply.decision == pb.DECISION_ALLOWED
            if key in admitted:
                assert reply.replayed
                assert reply.reservation_id == admitted[key][0]
            admitted[key] = (reply.reservation_id, tokens + 5)

        usage = await _usage(second)
        requests = len(admitted)
        reserved_tokens = sum(tokens for _, tokens in admitted.values())
        assert usage == {"requests": requests, "tokens": reserved_tokens, "in-flight": requests}

        # Commit everything on B (1 token each): every Commit is a first one, and the counters
        # then hold exactly the committed usage.
        for reservation_id, _ in admitted.values():
            done = await second.stub.Commit(
                pb.CommitRequest(reservation_id=reservation_id, input_tokens=1), timeout=5
            )
            assert not done.repeat
        assert await _usage(second) == {"requests": requests, "tokens": requests, "in-flight": 0}
    finally:
        await second.close()


async def _usage(quotad: Process) -> dict[str, int]:
    """Units in use per limit, summed over the six subjects of the restart test."""
    used = {"requests": 0, "tokens": 0, "in-flight": 0}
    for number in range(6):
        reply = await quotad.stub.GetUsage(pb.GetUsageRequest(subject=f"user-{number}"), timeout=5)
        for status in reply.limits:
            used[status.name] += status.limit - status.remaining
    return used


async def test_a_configmap_update_reaches_a_running_process(tmp_path: Path, own_redis: EmbeddedRedis) -> None:
    volume_dir = tmp_path / "policy"
    volume_dir.mkdir()
    volume = ConfigMapVolume(volume_dir)
    volume.publish(POLICY)
    quotad = Process(tmp_path, own_redis.url, volume_dir / "policy.yaml", QUOTAD_POLICY_POLL_MS="100")
    try:
        await quotad.wait_serving()
        volume.publish(POLICY.replace("limit: 1000000}", "limit: 3}"))
        deadline = time.monotonic() + 10
        while value(scrape(quotad.metrics_port), "quotad_policy_reloads_total", {"result": "success"}) < 1:
            assert time.monotonic() < deadline, "the new policy was not applied within 10 s"
            await asyncio.sleep(0.05)
        reply = await quotad.stub.CheckAndReserve(pb.CheckAndReserveRequest(subject="bob"), timeout=5)
        assert {s.name: s.limit for s in reply.limits}["in-flight"] == 3

        volume.publish(POLICY.replace("metric: concurrent", "metric: parallel"))
        while value(scrape(quotad.metrics_port), "quotad_policy_reloads_total", {"result": "failure"}) < 1:
            assert time.monotonic() < deadline, "the broken policy was not noticed within 10 s"
            await asyncio.sleep(0.05)
        reply = await quotad.stub.CheckAndReserve(pb.CheckAndReserveRequest(subject="bob"), timeout=5)
        assert {s.name: s.limit for s in reply.limits}["in-flight"] == 3  # the last good one stays
        quotad.process.send_signal(signal.SIGTERM)
        assert await _exit_code(quotad.process, 15) == 0
    finally:
        await quotad.close()
    refused = [line for line in quotad.lines() if line["event"].startswith("policy reload refused")]
    assert len(refused) == 1
    assert "tiers.t.limits[2].metric" in refused[0]["error"]
    assert "'parallel'" in refused[0]["error"]
    assert str(volume_dir / "policy.yaml") in refused[0]["error"]


def test_a_metrics_port_in_use_is_a_configuration_error(policy_path: Path, own_redis: EmbeddedRedis) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **os.environ,
            "QUOTAD_POLICY": str(policy_path),
            "QUOTAD_LISTEN": f"127.0.0.1:{free_port()}",
            "QUOTAD_METRICS_LISTEN": f"127.0.0.1:{taken.getsockname()[1]}",
            "QUOTAD_REDIS_URL": own_redis.url,
            "QUOTAD_LOG_FORMAT": "json",
        }
        result = subprocess.run(
            [*QUOTAD, "serve"], env=env, capture_output=True, text=True, timeout=30, check=False
        )
    assert result.returncode == 2
    assert "cannot serve metrics" in result.stderr


@pytest.mark.parametrize(
    ("policy", "warned"), [("allkeys-lru", True), ("volatile-ttl", True), ("noeviction", False)]
)
async def test_a_redis_that_may_evict_is_called_out_at_start(
    tmp_path: Path, own_redis: EmbeddedRedis, policy_path: Path, policy: str, warned: bool
) -> None:
    """Every quotad key has a TTL, so any eviction policy may drop live counters: say so at start."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("maxmemory-policy", policy)
    admin.close()
    quotad = Process(tmp_path, own_redis.url, policy_path)
    try:
        await quotad.wait_serving()
    finally:
        await quotad.close()
    warnings = [line for line in quotad.lines() if "maxmemory_policy" in line]
    assert bool(warnings) is warned
    if warned:
        assert warnings[0]["maxmemory_policy"] == policy
        assert warnings[0]["level"] == "warning"
        assert "noeviction" in warnings[0]["event"]
