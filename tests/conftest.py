"""Shared fixtures: a real Valkey server on a free port and real quotad gRPC servers on port 0."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis
import redis.asyncio as aioredis
import tiktoken
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.auth import Authenticator, TokenFile
from quotad_server.catalog import Catalog
from quotad_server.core import QuotaCore
from quotad_server.metrics import InstrumentedCore, InstrumentedStore, Metrics
from quotad_server.policy import parse_policy
from quotad_server.server import QuotadServer
from quotad_server.store import Store
from quotad_server.store.embedded import EmbeddedCluster, EmbeddedRedis, free_port
from quotad_server.store.redis import RedisStore
from quotad_server.tokens import load_encodings

RPC_TIMEOUT_S = 5.0
START_US = 1_800_000_000_123_457  # 2027-01-15; not round, so microsecond precision is exercised


@dataclass
class ManualClock:
    """A clock the test moves by hand; the store passes its reading to the scripts."""

    now_us: int = START_US

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += round(seconds * 1_000_000)


@dataclass
class Quotad:
    """A running quotad: a real grpc.aio server on a loopback port, and the generated stub."""

    port: int
    stub: pb_grpc.QuotaServiceAsyncStub
    channel: grpc.aio.Channel
    store: RedisStore
    server: QuotadServer
    clock: ManualClock | None
    defaults: dict[str, object] = field(default_factory=dict)
    core: QuotaCore | None = None

    async def reserve(self, **fields: object) -> pb.CheckAndReserveResponse:
        request = pb.CheckAndReserveRequest(**{**self.defaults, **fields})  # type: ignore[arg-type]
        # A caller's deadline covers the wait it asks for, as a real caller's must: a waiter may be
        # admitted at its last heartbeat before max_wait, not only when a wake-up reaches it.
        # Bounded: the bad-input tests send max_waits of 10,000 years and below zero, refused at once.
        waits_s = min(max(request.max_wait.seconds, 0), 60)
        return await self.stub.CheckAndReserve(request, timeout=RPC_TIMEOUT_S + waits_s)

    async def commit(self, reservation_id: str, input_tokens: int, output_tokens: int) -> pb.CommitResponse:
        request = pb.CommitRequest(
            reservation_id=reservation_id, input_tokens=input_tokens, output_tokens=output_tokens
        )
        return await self.stub.Commit(request, timeout=RPC_TIMEOUT_S)

    async def release(self, reservation_id: str) -> pb.ReleaseResponse:
        return await self.stub.Release(
            pb.ReleaseRequest(reservation_id=reservation_id), timeout=RPC_TIMEOUT_S
        )

    async def usage(self, **fields: str) -> dict[str, int]:
        """Remaining units per limit name, as GetUsage reports them."""
        subject = fields.pop("subject", str(self.defaults.get("subject", "")))
        model = fields.pop("model", str(self.defaults.get("model", "")))
        request = pb.GetUsageRequest(subject=subject, model=model, **fields)
        response = await self.stub.GetUsage(request, timeout=RPC_TIMEOUT_S)
        return {status.name: status.remaining for status in response.limits}


QuotadFactory = Callable[..., AbstractAsyncContextManager[Quotad]]


_ENCODINGS: dict[str, tiktoken.Encoding] = {}


def catalog() -> Catalog:
    """The price catalog, loaded once per test session (as quotad loads it once at start)."""
    if not _CATALOG:
        _CATALOG.append(Catalog())
    return _CATALOG[0]


_CATALOG: list[Catalog] = []


def encodings() -> dict[str, tiktoken.Encoding]:
    """The tokenizers, loaded once per test session (as quotad loads them once at start)."""
    if not _ENCODINGS:
        _ENCODINGS.update(load_encodings())
    return _ENCODINGS


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real Valkey server for the session (tests flush it between them)."""
    with EmbeddedRedis() as server:
        yield server


SLOTS = 16384


@contextmanager
def redis_cluster(shards: int) -> Iterator[list[EmbeddedRedis]]:
    """A real Redis Cluster of `shards` Valkey nodes on loopback, the slots split evenly between them."""
    options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    with ExitStack() as stack:
        buses = [free_port() for _ in range(shards)]  # the default, port + 10000, may be taken or past 65535
        nodes = [
            stack.enter_context(EmbeddedRedis(options=(*options, "--cluster-port", str(bus))))
            for bus in buses
        ]
        clients = [stack.enter_context(redis.Redis(port=node.port)) for node in nodes]
        for index, client in enumerate(clients):
            client.cluster("ADDSLOTSRANGE", index * SLOTS // shards, (index + 1) * SLOTS // shards - 1)
            if index:
                client.cluster("MEET", "127.0.0.1", nodes[0].port, buses[0])
        deadline = time.monotonic() + 30
        while True:  # the nodes learn of each other by gossip
            states = [_cluster_info(client) for client in clients]
            if all(s.get("cluster_state") == "ok" and s.get("cluster_size") == str(shards) for s in states):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the cluster did not form within 30 s: {states}")
            time.sleep(0.05)
        yield nodes


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    info = client.cluster("INFO")  # redis-py parses CLUSTER INFO into a dict
    return {str(name): str(value) for name, value in info.items()}


@pytest.fixture(scope="session")
def two_shard_cluster() -> Iterator[list[EmbeddedRedis]]:
    with redis_cluster(2) as nodes:
        yield nodes


def _on_both_backends(module: str) -> bool:
    """Every integration test that starts its quotad through the `quotad` fixture, or reads Redis
    through `redis_client` or `redis_url`, runs twice: on one Valkey server (quotad's own client) and
    on a Redis Cluster of 3 shards, each with a replica (the cluster client, valkey-glide). Tests that
    need one server in particular (pausing it, its INFO) ask for `redis_server` and run once."""
    return module.startswith("tests.integration.")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and _on_both_backends(metafunc.module.__name__):
        metafunc.parametrize("backend", ["single", "cluster"], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """ "single" (one Valkey server, quotad's own client) or "cluster" (3 shards, valkey-glide)."""
    return str(getattr(request, "param", "single"))


@pytest.fixture(scope="session")
def session_cluster() -> Iterator[EmbeddedCluster]:
    """A real Redis Cluster for the session: 3 primaries, each with a replica (tests flush it)."""
    with EmbeddedCluster(3, 1) as cluster:
        yield cluster


@pytest.fixture
def redis_url(backend: str, request: pytest.FixtureRequest) -> str:
    """The URL quotad is given for the backend: one server, or every node of the cluster as seeds."""
    if backend == "cluster":
        cluster: EmbeddedCluster = request.getfixturevalue("session_cluster")
        return cluster.seeds
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    return server.url


class WholeCluster(aioredis.RedisCluster):
    """redis-py's cluster client, with KEYS over every primary (it asks one node by default)."""

    async def keys(self, pattern: Any = "*", **kwargs: Any) -> Any:
        return await super().keys(pattern, target_nodes=self.PRIMARIES, **kwargs)


@pytest.fixture
async def redis_client(backend: str, redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A redis-py client on the backend, flushed: the tests read what quotad wrote through it."""
    if backend == "cluster":
        host, _, port = redis_url.removeprefix("redis://").split(",")[0].partition(":")
        # It answers every command the tests send (KEYS, DUMP, GET, ZCARD, SCRIPT FLUSH...) as Redis does.
        client = cast(aioredis.Redis, WholeCluster(host=host, port=int(port)))
    else:
        client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    yield client
    await client.aclose()


async def snapshot(client: aioredis.Redis) -> dict[bytes | str, object]:
    """Every key with its serialized value: equal snapshots mean nothing changed.

    But the health probe's key, which every health check rewrites (see health.lua).
    """
    keys = [k for k in sorted(await client.keys("*")) if b":{health}:" not in k]
    return {k: await client.dump(k) for k in keys}


@asynccontextmanager
async def running_quotad(
    policy_yaml: str,
    redis_url: str,
    *,
    clock: ManualClock | None = None,
    timeout_s: float | None = None,
    health_interval_s: float = 0.05,
    max_prompt_bytes: int = 1 << 20,
    metrics: Metrics | None = None,
    tokens_file: Path | None = None,
    **defaults: object,
) -> AsyncIterator[Quotad]:
    """A quotad on `redis_url`; with `metrics`, wired as cli.py wires it when metrics are on;
    with `tokens_file`, it knows those bearer tokens (QUOTAD_TOKENS_FILE)."""
    policy = parse_policy(textwrap.dedent(policy_yaml), "test-policy.yaml")
    if "," in redis_url:  # the seeds of a cluster
        # glide's first connection maps the cluster: more than 250 ms on a busy machine
        store = RedisStore.cluster(redis_url, timeout_s=timeout_s or 1.0, clock=clock)
    else:
        store = RedisStore.from_url(redis_url, timeout_s=timeout_s or 0.25, clock=clock)
    await store.start()
    core_options: dict[str, Any] = {
        "encodings": encodings(),
        "catalog": catalog(),
        "max_prompt_bytes": max_prompt_bytes,
        "learning_refresh_s": 0,
        "stats_flush_s": 0,
    }
    served: Store = store
    core = QuotaCore(policy, store, **core_options)
    if metrics is not None:
        served = InstrumentedStore(store, metrics)
        core = InstrumentedCore(policy, served, metrics=metrics, **core_options)
        metrics.watch_policy(core)
    authenticator = Authenticator(TokenFile(str(tokens_file)) if tokens_file is not None else None)
    server = QuotadServer(
        core,
        served,
        listen="127.0.0.1:0",
        health_interval_s=health_interval_s,
        observer=metrics,
        authenticator=authenticator,
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Quotad(
            server.port, pb_grpc.QuotaServiceStub(channel), channel, store, server, clock, defaults, core
        )
    finally:
        await channel.close()
        await server.stop(0)
        await store.aclose()


@pytest.fixture
def quotad(redis_client: aioredis.Redis, redis_url: str) -> QuotadFactory:
    """`async with quotad(POLICY, clock=..., subject=...) as q:` starts a quotad on the session Redis,
    and again on the session cluster (see _on_both_backends)."""

    def start(policy_yaml: str, **kwargs: object) -> AbstractAsyncContextManager[Quotad]:
        return running_quotad(policy_yaml, redis_url, **kwargs)  # type: ignore[arg-type]

    return start


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """Await a call that must fail, and return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def storm(
    replicas: Sequence[Quotad], requests: Sequence[pb.CheckAndReserveRequest], clients: int
) -> list[pb.CheckAndReserveResponse]:
    """Send every request at once over `clients` channels (as separate backends would), the
    channels spread over the replicas."""
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{replicas[i % len(replicas)].port}") for i in range(clients)
    ]
    stubs = [pb_grpc.QuotaServiceStub(channel) for channel in channels]
    try:
        return list(
            await asyncio.gather(
                *(
                    stubs[i % clients].CheckAndReserve(request, timeout=RPC_TIMEOUT_S * 4)
                    for i, request in enumerate(requests)
                )
            )
        )
    finally:
        for channel in channels:
            await channel.close()
