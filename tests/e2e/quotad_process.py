"""`quotad serve` as a child process, with a gRPC channel, a health stub and its JSON log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.store.embedded import free_port

QUOTAD = [sys.executable, "-m", "quotad_server"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

POLICY = """\
defaults: {tier: t}
leases: {default: 15m, max: 15m}
tiers:
  t:
    limits:
      - {name: requests, metric: requests, limit: 1000000, period: 1d, algorithm: sliding_window}
      - {name: tokens, metric: total_tokens, limit: 1000000000, period: 1d, algorithm: sliding_window}
      - {name: in-flight, metric: concurrent, limit: 1000000}
"""


class Process:
    """One `quotad serve` child process on free ports, logging JSON to a file."""

    def __init__(self, tmp_path: Path, redis_url: str, policy: Path, **env: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = tmp_path / f"quotad-{self.port}.log"
        environment = {
            **os.environ,
            "QUOTAD_POLICY": str(policy),
            "QUOTAD_LISTEN": f"127.0.0.1:{self.port}",
            "QUOTAD_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "QUOTAD_REDIS_URL": redis_url,
            "QUOTAD_LOG_FORMAT": "json",
            "QUOTAD_HEALTH_INTERVAL_MS": "50",
            **env,
        }
        with self.log.open("w") as log:
            self.process = subprocess.Popen([*QUOTAD, "serve"], env=environment, stderr=log)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.QuotaServiceStub(self.channel)
        self.health: Any = health_pb2_grpc.HealthStub(self.channel)  # typeshed knows only sync stubs

    async def status(self, service: str = "") -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        status: int = response.status
        return status

    async def wait_serving(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if await self.status() == SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, f"not SERVING within {timeout_s:.0f} s"
            await asyncio.sleep(0.05)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    async def close(self) -> None:
        await self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
