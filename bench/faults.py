"""What quotad's answers are worth while Redis fails: three replicas under load, one fault at a time.

    python bench/faults.py                       # every probe, 10 s each
    python bench/faults.py --probes sigstop,restart --seconds 20
    python bench/faults.py --server-path OTHER/server   # another checkout's server (before/after)

Starts a real Valkey (or --redis-server BINARY), toxiproxy in front of it (`make tools`), three
quotad replicas (`python -m quotad_server serve`, metrics on) that reach Redis through the proxy,
and a fourth, direct one that checks. Callers spray all three replicas with CheckAndReserve, each
call for a subject of its own, while one fault plays:

  debug-sleep   DEBUG SLEEP 0.4 once a second (Redis runs what it read, then sleeps before replying)
  sigstop       SIGSTOP for 0.4 s once a second
  sigstop-2s    SIGSTOP for 2 s every 4 s
  delay-100     100 ms added each way by the proxy (below the 250 ms timeout, round trip 200 ms)
  jitter        125-275 ms each way
  delay-400     400 ms each way (past the timeout: every call's reply comes late)
  restart       Redis killed and restarted on its port (empty), every 3 s

Afterwards (once the replicas have heard the late replies and undone what they reserved),
every answer is checked through the fourth replica: an ALLOWED call must hold its one
reservation, an UNAVAILABLE one nothing. The table counts the answers that broke that, the
status codes other than those two, the slowest answers, and for restarts how long health
stayed NOT_SERVING once Redis answered again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/faults/toxiproxy.py drives the proxy, here as in the fault suite
from tests.faults.toxiproxy import Toxiproxy  # noqa: E402

POLICY = """
defaults: {tier: t}
tiers:
  t:
    limits:
      - {name: tph, metric: total_tokens, limit: 1000, period: 1h, algorithm: sliding_window}
      - {name: in-flight, metric: concurrent, limit: 1}
"""
PROBES = ("debug-sleep", "sigstop", "sigstop-2s", "delay-100", "jitter", "delay-400", "restart")
LATE_OUTCOMES = ("undone", "held", "stuck")


@dataclass
class Answer:
    subject: str
    code: str
    seconds: float
    started: float


@dataclass
class Probe:
    name: str
    answers: list[Answer] = field(default_factory=list)
    not_serving_s: list[float] = field(default_factory=list)  # after Redis answered again (restart)
    restarted_at: float = 0.0  # Redis lost every key then: only later answers can be checked
    late: Counter[str] = field(default_factory=Counter)
    unavailable_charged: int = 0
    allowed_not_charged: int = 0


@dataclass
class Replica:
    address: str
    metrics_port: int
    process: subprocess.Popen[bytes]


@contextmanager
def replica(
    policy: Path, redis_url: str, timeout_ms: int, server_path: Path | None, log: Path
) -> Iterator[Replica]:
    address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    env = {
        **os.environ,
        "QUOTAD_POLICY": str(policy),
        "QUOTAD_LISTEN": address,
        "QUOTAD_REDIS_URL": redis_url,
        "QUOTAD_REDIS_TIMEOUT_MS": str(timeout_ms),
        "QUOTAD_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "QUOTAD_LOG_LEVEL": "warning",
        "QUOTAD_SHUTDOWN_GRACE_S": "1",
    }
    if server_path is not None:
        env["PYTHONPATH"] = str(server_path)
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotad_server", "serve"], env=env, stdout=output, stderr=output
        )
    try:
        yield Replica(address, metrics_port, process)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


async def serving(stub: Any) -> bool:
    """Whether a replica's health is SERVING (`stub`: a HealthStub on an aio channel)."""
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def late_counts(replicas: list[Replica]) -> Counter[str]:
    """quotad_late_reservations_total by outcome, summed over the replicas."""
    counts: Counter[str] = Counter()
    for r in replicas:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5) as page:
                text = page.read().decode()
        except OSError:  # busy, or a build without these metrics: nothing to add
            continue
        for line in text.splitlines():
            if line.startswith("quotad_late_reservations_total{"):
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                counts[outcome] += int(float(line.rsplit(" ", 1)[1]))
    return counts


class Bench:
    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.args = args
        workdir = Path(tempfile.mkdtemp(prefix="quotad-faults-"))
        policy = workdir / "policy.yaml"
        policy.write_text(POLICY)
        self.log = workdir / "replicas.log"
        options = ("--enable-debug-command", "yes", *args.redis_option)
        self.redis = stack.enter_context(EmbeddedRedis(server=args.redis_server, options=options))
        self.proxy = stack.enter_context(Toxiproxy())
        proxy_url = f"redis://127.0.0.1:{self.proxy.proxy('redis', self.redis.port)}/0"
        self.replicas = [
            stack.enter_context(replica(policy, proxy_url, args.timeout_ms, args.server_path, self.log))
            for _ in range(3)
        ]
        self.checker = stack.enter_context(replica(policy, self.redis.url, 5000, args.server_path, self.log))
        print(f"replica logs: {self.log}", file=sys.stderr)

    async def run(self) -> list[Probe]:
        channels = [grpc.aio.insecure_channel(r.address) for r in [*self.replicas, self.checker]]
        self.stubs = [pb_grpc.QuotaServiceStub(c) for c in channels]
        self.health: list[Any] = [health_pb2_grpc.HealthStub(c) for c in channels[:3]]
        for stub in (*self.health, health_pb2_grpc.HealthStub(channels[3])):
            for _ in range(300):
                if await serving(stub):
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"a replica did not become SERVING; see {self.log}")
        probes = []
        for name in self.args.probes:
            probe = Probe(name)
            before = late_counts(self.replicas)
            await self.load(probe, self.fault(name, probe))
            await self.settle()
            probe.late = late_counts(self.replicas) - before
            await self.check(probe)
            probes.append(probe)
            print(f"{name}: done", file=sys.stderr)
        for channel in channels:
            await channel.close()
        return probes

    def fault(self, name: str, probe: Probe) -> Callable[[], Awaitable[None]]:
        seconds = self.args.seconds
        proxy = self.proxy

        async def periodic(act: Callable[[], Awaitable[None]], every_s: float) -> None:
            ends = time.monotonic() + seconds
            while time.monotonic() < ends:
                await asyncio.sleep(every_s / 2)
                await act()
                await asyncio.sleep(every_s / 2)

        async def debug_sleep() -> None:
            await asyncio.to_thread(
                redis.Redis(port=self.redis.port).execute_command, "DEBUG", "SLEEP", "0.4"
            )

        async def sigstop(pause_s: float) -> None:
            assert self.redis.process is not None
            os.kill(self.redis.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(pause_s)
            finally:
                os.kill(self.redis.process.pid, signal.SIGCONT)

        async def restart() -> None:
            port = self.redis.port
            assert self.redis.process is not None
            self.redis.process.kill()  # no goodbye
            self.redis.stop()
            await asyncio.sleep(1.0)
            self.redis.port = port
            await asyncio.to_thread(self.redis.start)  # returns once Redis answers
            answered = probe.restarted_at = time.monotonic()
            waits = [self.until_serving(stub, answered) for stub in self.health]
            probe.not_serving_s.extend(await asyncio.gather(*waits))

        async def delayed(latency_ms: int, jitter_ms: int) -> None:
            for stream in ("upstream", "downstream"):  # off the event loop: the callers go on meanwhile
                await asyncio.to_thread(
                    proxy.add, "redis", stream, "latency", stream, latency=latency_ms, jitter=jitter_ms
                )
            try:
                await asyncio.sleep(seconds)
            finally:
                await asyncio.to_thread(proxy.reset)

        plays: dict[str, Callable[[], Awaitable[None]]] = {
            "debug-sleep": lambda: periodic(debug_sleep, 1.0),
            "sigstop": lambda: periodic(lambda: sigstop(0.4), 1.0),
            "sigstop-2s": lambda: periodic(lambda: sigstop(2.0), 4.0),
            "delay-100": lambda: delayed(100, 0),
            "jitter": lambda: delayed(200, 75),
            "delay-400": lambda: delayed(400, 0),
            "restart": lambda: periodic(restart, 3.0),
        }
        return plays[name]

    @staticmethod
    async def until_serving(stub: Any, since: float) -> float:
        while True:
            if await serving(stub):
                return time.monotonic() - since
            await asyncio.sleep(0.01)

    async def load(self, probe: Probe, fault: Callable[[], Awaitable[None]]) -> None:
        prefix = uuid.uuid4().hex[:8]
        done = asyncio.Event()

        async def caller(worker: int) -> None:
            stub = self.stubs[worker % 3]
            n = 0
            while not done.is_set():
                subject = f"{prefix}-{worker}-{n}"
                n += 1
                request = pb.CheckAndReserveRequest(subject=subject, input_tokens=100)
                started = time.monotonic()
                try:
                    response = await stub.CheckAndReserve(request, timeout=5)
                    code = "ALLOWED" if response.decision == pb.DECISION_ALLOWED else "DENIED"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                probe.answers.append(Answer(subject, code, time.monotonic() - started, started))
                await asyncio.sleep(self.args.pause_ms / 1000)

        callers = [asyncio.create_task(caller(w)) for w in range(self.args.callers)]
        try:
            await fault()
        finally:
            done.set()
            await asyncio.gather(*callers)

    async def settle(self) -> None:
        """Wait until the replicas have stopped undoing late reservations (the counts hold still)."""
        last, still = late_counts(self.replicas), 0
        while still < 3:
            await asyncio.sleep(1.0)
            now = late_counts(self.replicas)
            still = still + 1 if now == last else 0
            last = now

    async def check(self, probe: Probe) -> None:
        at_once = asyncio.Semaphore(16)
        checker = self.stubs[3]

        async def held(subject: str) -> bool:
            async with at_once:
                request = pb.GetUsageRequest(subject=subject)
                for _ in range(20):  # the checker too may be waiting for Redis after a restart
                    try:
                        reply = await checker.GetUsage(request, timeout=5)
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.5)
                else:
                    raise RuntimeError("the checking replica does not answer")
                in_flight = next(s.remaining for s in reply.limits if s.name == "in-flight")
                return in_flight == 0

        checked = [
            a
            for a in probe.answers
            if a.code in ("ALLOWED", "UNAVAILABLE", "DEADLINE_EXCEEDED") and a.started > probe.restarted_at
        ]
        holds = await asyncio.gather(*(held(a.subject) for a in checked))
        for answer, holding in zip(checked, holds, strict=True):
            if answer.code == "ALLOWED" and not holding:
                probe.allowed_not_charged += 1
            elif answer.code != "ALLOWED" and holding:
                probe.unavailable_charged += 1


def report(probes: list[Probe], timeout_ms: int) -> None:
    print(
        f"| probe | answers | allowed | unavailable | **unavailable yet charged** | allowed, not charged"
        f" | other codes | slowest answer | > 1.25 x {timeout_ms} ms | late replies undone / held / stuck"
        " | NOT_SERVING after Redis answered (max) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in probes:
        codes = Counter(a.code for a in p.answers)
        other = {c: n for c, n in codes.items() if c not in ("ALLOWED", "UNAVAILABLE")}
        slowest = max((a.seconds for a in p.answers), default=0.0)
        past = sum(1 for a in p.answers if a.seconds > 1.25 * timeout_ms / 1000)
        late = " / ".join(str(p.late[o]) for o in LATE_OUTCOMES)
        recovery = f"{max(p.not_serving_s):.2f} s" if p.not_serving_s else "-"
        print(
            f"| {p.name} | {len(p.answers)} | {codes['ALLOWED']} | {codes['UNAVAILABLE']}"
            f" | **{p.unavailable_charged}** | {p.allowed_not_charged} | {other or 0}"
            f" | {slowest * 1000:.0f} ms | {past} | {late} | {recovery} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probes", default=",".join(PROBES), type=lambda s: s.split(","))
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each fault plays")
    parser.add_argument("--callers", type=int, default=48)
    parser.add_argument("--pause-ms", type=float, default=5.0, help="each caller's pause between calls")
    parser.add_argument("--timeout-ms", type=int, default=250, help="the replicas' QUOTAD_REDIS_TIMEOUT_MS")
    parser.add_argument("--redis-server", type=Path, help="another Redis-compatible server binary")
    parser.add_argument("--server-path", type=Path, help="run the quotad_server package found here")
    parser.add_argument(
        "--redis-option",
        action="append",
        default=[],
        help="one more server argument, e.g. --redis-option=--save=60 1",
    )
    args = parser.parse_args()
    unknown = set(args.probes) - set(PROBES)
    if unknown:
        parser.error(f"unknown probes {sorted(unknown)}; known: {', '.join(PROBES)}")
    with ExitStack() as stack:
        probes = asyncio.run(Bench(args, stack).run())
    report(probes, args.timeout_ms)


if __name__ == "__main__":
    main()
