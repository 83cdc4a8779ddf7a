"""A live quotad for the other languages' tests: `python -m quotad_server serve` on a real Valkey.

The TypeScript, Go and Java suites reach it through $QUOTAD_ADDR; they fail, never skip,
when it is not set or not answering. Their outage tests pause its Valkey (SIGSTOP, then
SIGCONT) through $QUOTAD_REDIS_PID: each suite runs its tests one at a time, so no other
test of it is under way meanwhile. Their server-side waiting tests read the waiting lines
from that Valkey, at $QUOTAD_REDIS_ADDR (host:port), to know when a request waits in line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from quotad_server.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_POLICY = ROOT / "tests" / "conformance" / "policy.yaml"
EXAMPLE_POLICY = ROOT / "server" / "quotad_server" / "examples" / "policy.yaml"
MAVEN_REPO = ROOT / ".tools" / "m2"


@dataclass
class LiveQuotad:
    """A quotad process; `env` is the environment to run a client's tests in."""

    address: str
    redis: EmbeddedRedis
    process: subprocess.Popen[str]

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "QUOTAD_ADDR": self.address,
            "QUOTAD_REDIS_PID": str(self.redis_pid),
            "QUOTAD_REDIS_ADDR": f"127.0.0.1:{self.redis.port}",
        }

    @property
    def redis_pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid


def wait_serving(address: str, process: subprocess.Popen[str], log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"quotad exited with {process.returncode}:\n{log.read_text()}")
            try:
                answer = check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    pytest.fail(f"quotad at {address} did not become SERVING within {timeout_s} s:\n{log.read_text()}")


def serve(policy: Path, log: Path) -> Iterator[LiveQuotad]:
    with EmbeddedRedis() as store, log.open("w") as log_file:
        address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "QUOTAD_POLICY": str(policy),
            "QUOTAD_LISTEN": address,
            "QUOTAD_REDIS_URL": store.url,
            "QUOTAD_LOG_LEVEL": "warning",
            "QUOTAD_SHUTDOWN_GRACE_S": "1",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "quotad_server", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_serving(address, process, log)
            yield LiveQuotad(address, store, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def conformance_quotad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveQuotad]:
    """quotad with tests/conformance/policy.yaml: what every client's own suite expects."""
    yield from serve(CONFORMANCE_POLICY, tmp_path_factory.mktemp("quotad") / "quotad.log")


@pytest.fixture(scope="module")
def example_quotad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveQuotad]:
    """quotad with the example policy, as `make run` serves it: what the READMEs' examples expect."""
    yield from serve(EXAMPLE_POLICY, tmp_path_factory.mktemp("quotad") / "quotad.log")


def run(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 600) -> str:
    """Run a client's test command; fail with its output unless it exits 0."""
    try:
        result = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    finally:
        if "QUOTAD_REDIS_PID" in env:  # an outage test that was cut short may have left it paused
            os.kill(int(env["QUOTAD_REDIS_PID"]), signal.SIGCONT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`{' '.join(command)}` in {cwd} exited {result.returncode}:\n{output}"
    return output
