"""Policy hot reload on a real server: a new limit applies within moments while traffic flows,
reservations made before it settle on their own limits, and a broken file changes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog
from quotad.v1 import quota_pb2 as pb
from quotad_server.metrics import Metrics, MetricsEndpoint
from quotad_server.policy import PolicyError
from quotad_server.reload import PolicyFile, PolicyWatcher

from tests.configmap import ConfigMapVolume
from tests.conftest import Quotad, QuotadFactory
from tests.metrics_scrape import scrape, value

POLL_S = 0.05
APPLY_WITHIN_S = 3.0  # dozens of polls; generous for a loaded 2-core machine

POLICY = """\
defaults: {{tier: t}}
leases: {{default: 10m, max: 10m}}
tiers:
  t:
    limits:
      - {{name: tokens, metric: total_tokens, limit: {tokens}, period: 1d, algorithm: sliding_window}}
{extra}"""
IN_FLIGHT = "      - {name: in-flight, metric: concurrent, limit: 1}\n"


def policy(tokens: int, *, in_flight: bool = False) -> str:
    return POLICY.format(tokens=tokens, extra=IN_FLIGHT if in_flight else "")


@dataclass
class Reloading:
    q: Quotad
    path: Path
    metrics: Metrics
    metrics_port: int
    watcher: PolicyWatcher

    def write(self, text: str) -> None:
        """Replace the file by rename, as Kubernetes and config tools do (never half-written)."""
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(self.path)


@dataclass
class Traffic:
    """Reserve-then-commit in a loop, recording the `tokens` limit every answer reports."""

    q: Quotad
    seen: list[tuple[float, int]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    async def run(self, stop: asyncio.Event, subject: str) -> None:
        while not stop.is_set():
            try:
                reply = await self.q.reserve(subject=subject, input_tokens=10)
                limits = {s.name: s.limit for s in reply.limits}
                self.seen.append((time.monotonic(), limits["tokens"]))
                if reply.decision == pb.DECISION_ALLOWED:
                    await self.q.commit(reply.reservation_id, input_tokens=5, output_tokens=0)
            except Exception as error:
                self.errors.append(error)
                return


@pytest.fixture
async def reloading(quotad: QuotadFactory, tmp_path: Path) -> AsyncIterator[Reloading]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(100_000, in_flight=True))
    policy_file = PolicyFile(str(path))
    metrics = Metrics()
    endpoint = MetricsEndpoint(metrics, "127.0.0.1:0")
    # A generous Redis timeout: this test is about reloads, not about a slow Redis on a busy machine.
    async with quotad(path.read_text(), metrics=metrics, timeout_s=2.0, subject="alice") as q:
        assert q.core is not None
        q.core.policy = policy_file.load()  # the file's own path names it in errors
        watcher = PolicyWatcher(policy_file, q.core, interval_s=POLL_S, recorder=metrics)
        watcher.start()
        try:
            yield Reloading(q, path, metrics, endpoint.port, watcher)
        finally:
            await watcher.stop()
            endpoint.close()


async def _until(predicate: object, within_s: float) -> float:
    """Wait (polling, no fixed sleep) until predicate() is true; return how long it took."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < within_s, "not within the expected time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_new_limit_applies_while_traffic_flows(reloading: Reloading) -> None:
    traffic = Traffic(reloading.q)
    stop = asyncio.Event()
    workers = [asyncio.create_task(traffic.run(stop, f"user-{i}")) for i in range(4)]
    try:
        await _until(lambda: len(traffic.seen) >= 20, 10)
        reloading.write(policy(50_000, in_flight=True))
        changed_at = time.monotonic()
        await _until(lambda: traffic.seen[-1][1] == 50_000, APPLY_WITHIN_S)
        applied_at = traffic.seen[-1][0]
        count = len(traffic.seen)
        await _until(lambda: len(traffic.seen) >= count + 20, 10)
    finally:
        stop.set()
        await asyncio.gather(*workers)

    assert traffic.errors == []  # no RPC failed across the reload
    assert applied_at - changed_at < APPLY_WITHIN_S
    # Every decision after the first one under the new policy sees it: no flapping back.
    first_new = next(i for i, (_, limit) in enumerate(traffic.seen) if limit == 50_000)
    assert {limit for _, limit in traffic.seen[first_new:]} == {50_000}
    assert {limit for _, limit in traffic.seen[:first_new]} == {100_000}
    samples = scrape(reloading.metrics_port)
    assert value(samples, "quotad_policy_reloads_total", {"result": "success"}) == 1
    assert value(samples, "quotad_policy_limit", {"limit": "tokens"}) == 50_000


async def test_reservations_made_before_a_reload_settle_on_their_own_limits(reloading: Reloading) -> None:
    q = reloading.q
    held = await q.reserve(input_tokens=1_000, max_output_tokens=1_000)
    assert held.decision == pb.DECISION_ALLOWED
    assert (await q.reserve()).binding_limit == "in-flight"  # the one slot is taken

    # The new policy lowers `tokens` and drops `in-flight` altogether.
    reloading.write(policy(50_000))
    await _until(lambda: _limit(reloading) == 50_000, APPLY_WITHIN_S)
    assert await q.usage() == {"tokens": 50_000 - 2_000}  # the same counter, under its new limit

    committed = await q.commit(held.reservation_id, input_tokens=300, output_tokens=100)
    assert not committed.repeat
    assert await q.usage() == {"tokens": 50_000 - 400}

    # Back to the first policy: the Commit above also freed the `in-flight` slot, a limit the
    # policy in force at the time did not have. It settled on the limits stored with the reservation.
    reloading.write(policy(100_000, in_flight=True))
    await _until(lambda: _limit(reloading) == 100_000, APPLY_WITHIN_S)
    assert await q.usage() == {"tokens": 100_000 - 400, "in-flight": 1}


def _limit(reloading: Reloading) -> int:
    assert reloading.q.core is not None
    return reloading.q.core.policy.tier_limits["t"][0].limit


async def test_a_broken_file_is_refused_and_the_old_policy_stays(reloading: Reloading) -> None:
    q = reloading.q
    with structlog.testing.capture_logs() as logs:
        reloading.write(policy(100_000).replace("period: 1d", "period: 1 day"))
        await _until(
            lambda: (
                value(scrape(reloading.metrics_port), "quotad_policy_reloads_total", {"result": "failure"})
                == 1
            ),
            APPLY_WITHIN_S,
        )
        await asyncio.sleep(POLL_S * 4)  # more polls of the same bad file: reported once, not again
    refused = [line for line in logs if line["event"].startswith("policy reload refused")]
    assert len(refused) == 1
    assert refused[0]["log_level"] == "error"
    error = refused[0]["error"]
    assert str(reloading.path) in error
    assert "tiers.t.limits[0].period" in error
    assert "'1 day'" in error

    # Still in force: the old policy, in full (in-flight included).
    reply = await q.reserve(input_tokens=10)
    assert {s.name: s.limit for s in reply.limits} == {"tokens": 100_000, "in-flight": 1}
    samples = scrape(reloading.metrics_port)
    assert value(samples, "quotad_policy_reloads_total", {"result": "success"}) == 0

    # Fixing the file applies it.
    reloading.write(policy(70_000))
    await _until(lambda: _limit(reloading) == 70_000, APPLY_WITHIN_S)
    assert value(scrape(reloading.metrics_port), "quotad_policy_reloads_total", {"result": "success"}) == 1


@pytest.fixture
def configmap_dir(tmp_path: Path) -> tuple[Path, ConfigMapVolume]:
    volume = ConfigMapVolume(tmp_path)
    volume.publish(policy(100))
    return tmp_path / "policy.yaml", volume


def test_a_configmap_symlink_swap_is_a_new_version(configmap_dir: tuple[Path, ConfigMapVolume]) -> None:
    path, volume = configmap_dir
    policy_file = PolicyFile(str(path))
    assert policy_file.load().tier_limits["t"][0].limit == 100
    assert policy_file.poll() is None

    volume.publish(policy(200))
    found = policy_file.poll()
    assert found is not None
    assert found.tier_limits["t"][0].limit == 200
    assert policy_file.poll() is None

    volume.publish(policy(200))  # a new version with the same content: nothing to apply
    assert policy_file.poll() is None

    volume.publish("tiers: [")
    with pytest.raises(PolicyError, match="not valid YAML"):
        policy_file.poll()
    assert policy_file.poll() is None  # the same broken version is not reported twice
