"""Build and run the gRPC server: QuotaService, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from quotad.v1 import quota_pb2 as pb

from quotad_server.api import QuotaServicer, RpcObserver, add_service
from quotad_server.auth import Authenticator
from quotad_server.core import QuotaCore
from quotad_server.envoy import SERVICE as ENVOY_SERVICE
from quotad_server.envoy import RateLimitServicer
from quotad_server.errors import StoreUnavailable
from quotad_server.store import Store
from quotad_server.tls import ServerTls

SERVICE = pb.DESCRIPTOR.services_by_name["QuotaService"]
SERVICE_NAME = SERVICE.full_name
_HEALTH = descriptor_pool.Default().FindServiceByName(health.SERVICE_NAME)
_REFLECTION = descriptor_pool.Default().FindServiceByName(reflection.SERVICE_NAME)
STOP_TASKS_S = 5.0
"""How long stop() waits for the health monitor and the wake-up listener to end."""
RECHECK_S = 0.1
"""How often health re-checks Redis while NOT_SERVING (QUOTAD_HEALTH_INTERVAL_MS applies while SERVING)."""
LIVENESS_SERVICE = "liveness"
"""Health name that is SERVING while the process can answer at all, whatever Redis does:
for liveness probes, so a Redis outage never gets every replica restarted."""
_log = structlog.get_logger("quotad.server")


class QuotadServer:
    """One gRPC server process.

    Health is SERVING only once the tokenizers are loaded and while the store
    answers: a monitor checks every `health_interval_s` and flips the overall ("")
    and the QuotaService status. The policy is loaded before the server is built.
    `LIVENESS_SERVICE` is SERVING from start until the server stops accepting RPCs.

    With `tls`, `listen` serves TLS only (health and reflection included); `local_socket`
    also serves everything in plaintext on a Unix socket, for probes and tools inside the
    pod (the policy's callers rules still apply there: it carries no identity).
    """

    def __init__(
        self,
        core: QuotaCore,
        store: Store,
        *,
        listen: str,
        health_interval_s: float = 1.0,
        observer: RpcObserver | None = None,
        tls: ServerTls | None = None,
        local_socket: str = "",
        authenticator: Authenticator | None = None,
    ) -> None:
        self._core = core
        self._store = store
        self._health_interval_s = health_interval_s
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        # Registered by add_service rather than the generated add_*_to_server: same methods,
        # but a body that does not decode is INVALID_ARGUMENT, not grpc's UNKNOWN. grpc's own
        # health and reflection servicers get the same answer from a guard in front of them.
        add_service(self._server, SERVICE, QuotaServicer(core, observer, authenticator))
        # Envoy's rate limit service, on the same port, over the same core (see docs/envoy.md).
        add_service(self._server, ENVOY_SERVICE, RateLimitServicer(core, observer, authenticator))
        self._health = health.aio.HealthServicer()
        add_service(self._server, _HEALTH, self._health, refuse_undecodable=True)
        reflected = (SERVICE_NAME, ENVOY_SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        add_service(
            self._server, _REFLECTION, reflection.aio.ReflectionServicer(reflected), refuse_undecodable=True
        )
        if tls is not None:
            self.port = self._server.add_secure_port(listen, tls.credentials())
        else:
            self.port = self._server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        if local_socket:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(local_socket).st_mode):  # a previous process's, left behind
                    os.unlink(local_socket)
            if not self._server.add_insecure_port(f"unix:{local_socket}"):
                raise OSError(f"cannot listen on the Unix socket {local_socket}")
        self._monitor: asyncio.Task[None] | None = None
        self._wakeups: asyncio.Task[None] | None = None
        self._escrow: asyncio.Task[None] | None = None
        self._stopping = False
        self._serving: bool | None = None
        self._reason = ""

    async def _set_serving(self, serving: bool, reason: str = "") -> None:
        """Set the health of the whole server and of QuotaService; log each change, and why.

        While NOT_SERVING, a new reason is logged too (a lost connection that becomes a Redis
        loading its dataset, say): an operator sees at warning level why decisions fail.
        """
        if serving == self._serving and (serving or reason == self._reason):
            return
        if serving != self._serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", SERVICE_NAME, ENVOY_SERVICE.full_name):
                await self._health.set(service, status)
        if serving:
            _log.info("health changed", serving=True)
        elif reason:
            _log.warning("health changed", serving=False, reason=reason)
        self._serving, self._reason = serving, reason

    async def _watch_store(self) -> None:
        # Not `while True`: a cancel that lands while a probe is in flight can be swallowed (it
        # surfaces as a connection error), and stop() would then wait for this loop forever.
        while not self._stopping:
            try:
                await self._store.ping()
                ready = self._core.ready
                await self._set_serving(ready, "" if ready else "the tokenizers are still loading")
            except StoreUnavailable as error:
                await self._set_serving(False, str(error))
            # While NOT_SERVING, look again soon: SERVING comes back within RECHECK_S of Redis.
            await asyncio.sleep(
                self._health_interval_s if self._serving else min(self._health_interval_s, RECHECK_S)
            )

    async def start(self) -> None:
        await self._set_serving(False, "starting")
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._server.start()
        self._monitor = asyncio.create_task(self._watch_store(), name="quotad-health")
        self._wakeups = asyncio.create_task(self._core.watch_wakeups(), name="quotad-wakeups")
        self._escrow = asyncio.create_task(self._core.maintain_escrow(), name="quotad-escrow")

    async def stop(self, grace_s: float, drain_s: float = 0.0) -> None:
        """Stop gracefully: health NOT_SERVING at once; for `drain_s` new RPCs are still served
        (load balancers and health-checking clients move away meanwhile); then new RPCs are
        refused and in-flight ones get `grace_s` to finish."""
        self._stopping = True
        tasks = [task for task in (self._monitor, self._wakeups, self._escrow) if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a task that swallowed its cancel must not hold the shutdown up
            await asyncio.wait(tasks, timeout=STOP_TASKS_S)
        await self._set_serving(False, "stopping")
        if drain_s > 0:
            _log.info("draining: NOT_SERVING, still answering new RPCs", drain_s=drain_s)
            await asyncio.sleep(drain_s)
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
