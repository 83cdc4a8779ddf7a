"""The composition root: settings -> logging -> policy -> store -> core -> server.

`quotad serve` runs the service; `quotad check-policy FILE` validates a policy
offline. This is the only module that picks implementations.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import structlog

from quotad_server import __version__
from quotad_server.auth import Authenticator, TokenFile, hash_token
from quotad_server.catalog import Catalog, resolve
from quotad_server.core import QuotaCore
from quotad_server.errors import StoreUnavailable
from quotad_server.logs import configure_logging
from quotad_server.metrics import InstrumentedCore, InstrumentedStore, Metrics, MetricsEndpoint
from quotad_server.model import Price, ServiceTier
from quotad_server.policy import PolicyError, default_encoding, load_policy
from quotad_server.probe import health, local_sockets
from quotad_server.reload import PolicyFile, PolicyWatcher
from quotad_server.server import QuotadServer
from quotad_server.settings import Settings, SettingsError
from quotad_server.store import Store
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore
from quotad_server.tls import ServerTls
from quotad_server.tokens import load_encodings, prepare_cache

EXIT_CONFIG = 2


def redis_connection_options(settings: Settings) -> dict[str, Any]:
    """The connection options (RedisStore.from_url) for the password and TLS settings that are set."""
    options: dict[str, Any] = {}
    if settings.redis_password:
        options["password"] = settings.redis_password
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = settings.redis_tls_ca_file
    if settings.redis_tls_cert_file:
        options["ssl_certfile"] = settings.redis_tls_cert_file
        options["ssl_keyfile"] = settings.redis_tls_key_file
    return options


def open_metrics(metrics: Metrics, settings: Settings) -> MetricsEndpoint:
    if settings.metrics_fd >= 0:  # a worker of `serve --workers N`: its supervisor bound the socket
        return MetricsEndpoint.on_inherited(metrics, settings.metrics_fd)
    return MetricsEndpoint(metrics, settings.metrics_listen)


async def redis_fits(store: RedisStore, log: Any) -> bool:
    """Warn of an eviction policy that may drop counters; refuse a Redis Cluster of several shards
    to the single-server client (QUOTAD_REDIS_CLUSTER=false)."""
    eviction = await store.eviction_policy()
    if eviction not in (None, "noeviction"):
        log.warning(
            "redis may evict quotad's counters when memory runs short, and an evicted counter"
            " admits what it should deny: set maxmemory-policy noeviction",
            maxmemory_policy=eviction,
        )
    shards = await store.cluster_shards()
    if shards is not None and shards > 1 and not store.follows_cluster:
        log.error(
            "QUOTAD_REDIS_URL is one node of a Redis Cluster of several shards, and QUOTAD_REDIS_CLUSTER=false"
            " talks to one server: decisions whose keys live on another shard would fail. Set"
            " QUOTAD_REDIS_CLUSTER to auto or true",
            cluster_shards=shards,
        )
        return False
    return True


async def open_store(settings: Settings, redis_url: str, log: Any, **options: Any) -> RedisStore:
    """The store on `redis_url`, with the client QUOTAD_REDIS_CLUSTER picks, started if Redis answers.

    quotad's own client for one server (it costs a sixth of the cluster client's CPU per call,
    see store/cluster.py); valkey-glide's cluster client for a URL of several seeds, for
    QUOTAD_REDIS_CLUSTER=true, and, with auto, for a node of a cluster of several shards.
    """
    seeds = "," in redis_url.partition("://")[2].partition("/")[0]
    if settings.redis_cluster == "true" or seeds:
        store = RedisStore.cluster(redis_url, **options)
    else:
        store = RedisStore.from_url(redis_url, **options)
    try:
        await store.start()
        if (
            settings.redis_cluster == "auto"
            and not store.follows_cluster
            and not redis_url.startswith("unix:")
        ):
            shards = await store.cluster_shards()  # (over a Unix socket, redis_fits refuses a cluster)
            if shards is not None and shards > 1:
                await store.aclose()
                log.info(
                    "redis is a cluster of several shards: using the cluster client", cluster_shards=shards
                )
                store = RedisStore.cluster(redis_url, **options)
                await store.start()
    except StoreUnavailable as error:
        log.error(
            "redis is not reachable at start; health stays NOT_SERVING until it is"
            + (
                ""
                if store.follows_cluster
                else " (a Redis Cluster of several shards needs QUOTAD_REDIS_CLUSTER=true then)"
            ),
            error=str(error),
        )
    return store


async def serve(settings: Settings) -> int:
    log = structlog.get_logger("quotad")
    policy_file = PolicyFile(settings.policy_path)
    policy = policy_file.load()
    metrics = Metrics() if settings.metrics_listen else None
    async with AsyncExitStack() as stack:
        redis_url = settings.redis_url
        if settings.embedded_redis:  # Settings allow it only by name (QUOTAD_EMBEDDED_REDIS)
            embedded = stack.enter_context(EmbeddedRedis())
            redis_url = embedded.url
            log.warning(
                "no QUOTAD_REDIS_URL: started an embedded Valkey server for development;"
                " its state is lost on exit",
                redis_url=redis_url,
            )
        store = await open_store(
            settings,
            redis_url,
            log,
            timeout_s=settings.redis_timeout_ms / 1000,
            key_prefix=settings.key_prefix,
            late_observer=metrics.late_reservation if metrics is not None else None,
            **redis_connection_options(settings),
        )
        stack.push_async_callback(store.aclose)
        if not await redis_fits(store, log):
            return EXIT_CONFIG
        served: Store = store
        core_options: dict[str, Any] = {"max_prompt_bytes": settings.max_prompt_bytes}
        core = QuotaCore(policy, store, **core_options)
        if metrics is not None:
            served = InstrumentedStore(store, metrics)
            core = InstrumentedCore(policy, served, metrics=metrics, **core_options)
            metrics.watch_policy(core)
            metrics.policy_loaded(policy_file.digest)
            try:
                endpoint = open_metrics(metrics, settings)
            except OSError as error:
                log.error("cannot serve metrics", listen=settings.metrics_listen, error=str(error))
                return EXIT_CONFIG
            stack.callback(endpoint.close)
            log.info("metrics endpoint", listen=settings.metrics_listen, port=endpoint.port, path="/metrics")
        if (edge := who_may_connect(settings)) is None:
            return EXIT_CONFIG
        tls, tokens = edge
        server = QuotadServer(
            core,
            served,
            listen=settings.listen,
            health_interval_s=settings.health_interval_ms / 1000,
            observer=metrics,
            tls=tls,
            local_socket=settings.local_socket,
            authenticator=Authenticator(tokens),
        )
        await server.start()
        # Health stays NOT_SERVING until the tokenizers are in memory (off the event loop).
        core.catalog = await asyncio.to_thread(Catalog)
        core.encodings = await asyncio.to_thread(load_encodings, settings.tiktoken_cache_dir)
        if settings.policy_poll_ms:
            watcher = PolicyWatcher(
                policy_file, core, interval_s=settings.policy_poll_ms / 1000, recorder=metrics
            )
            watcher.start()
            stack.push_async_callback(watcher.stop)
        log.info(
            "serving",
            listen=settings.listen,
            tls="mutual" if settings.tls_client_ca else "on" if tls else "off",
            tokens=settings.tokens_file or None,
            callers=len(core.policy.callers),
            local_socket=settings.local_socket or None,
            port=server.port,
            pid=os.getpid(),
            policy=settings.policy_path,
            version=__version__,
        )

        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("stopping", drain_ms=settings.shutdown_drain_ms, grace_s=settings.shutdown_grace_s)
        await server.stop(settings.shutdown_grace_s, settings.shutdown_drain_ms / 1000)
        await core.flush()
        log.info("stopped")
    return 0


def supervise(settings: Settings) -> int:
    """Run `settings.workers` server processes on one port (SO_REUSEPORT) and stop them together.

    The workers share one Redis: the embedded one is started here, once, when no URL is set.
    If a worker dies, the others are stopped too and the exit code says so: let the
    orchestrator restart the whole set rather than run with fewer workers unnoticed.
    """
    log = structlog.get_logger("quotad")
    with ExitStack() as stack:
        redis_url = settings.redis_url
        if settings.embedded_redis:
            redis_url = stack.enter_context(EmbeddedRedis()).url
            log.warning("no QUOTAD_REDIS_URL: started an embedded Valkey server shared by the workers")
        env = {
            **os.environ,
            "QUOTAD_REDIS_URL": redis_url,
            "QUOTAD_EMBEDDED_REDIS": "",
            "QUOTAD_WORKERS": "1",
        }
        envs = [env] * settings.workers
        if settings.local_socket:  # one socket a worker: `quotad health` checks every one
            envs = [
                {**env, "QUOTAD_LOCAL_SOCKET": path}
                for path in local_sockets(settings.local_socket, len(envs))
            ]
        listeners: list[socket.socket] = []
        ports: list[int] = []
        if settings.metrics_listen:
            # One endpoint on the configured port, here; each worker serves its own on loopback,
            # on a socket bound here and handed down: no other process can take its port between.
            listeners = [stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in envs]
            ports = [listener.getsockname()[1] for listener in listeners]
            try:
                endpoint = MetricsEndpoint.for_workers(ports, settings.metrics_listen)
            except OSError as error:
                log.error("cannot serve metrics", listen=settings.metrics_listen, error=str(error))
                return EXIT_CONFIG
            stack.callback(endpoint.close)
            envs = [
                {
                    **worker_env,
                    "QUOTAD_METRICS_LISTEN": f"127.0.0.1:{port}",
                    "QUOTAD_METRICS_FD": str(listener.fileno()),
                }
                for worker_env, port, listener in zip(envs, ports, listeners, strict=True)
            ]
        handed_down = [[listener.fileno()] for listener in listeners] or [[]] * len(envs)
        workers = [
            subprocess.Popen([sys.executable, "-m", "quotad_server", "serve"], env=worker_env, pass_fds=fds)
            for worker_env, fds in zip(envs, handed_down, strict=True)
        ]
        for listener in listeners:
            listener.close()  # each worker holds its own now
        log.info(
            "workers started",
            workers=settings.workers,
            pids=[w.pid for w in workers],
            metrics_ports=ports,
        )

        def forward(signum: int, _frame: object) -> None:
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        codes: list[int] = []
        while len(codes) < len(workers):
            pid, status = os.wait()
            codes.append(os.waitstatus_to_exitcode(status))
            if codes[-1] != 0:
                log.error("a worker exited; stopping the others", pid=pid, exit_code=codes[-1])
                forward(signal.SIGTERM, None)
        for worker in workers:
            worker.returncode = 0  # reaped by os.wait above
    return max((abs(code) for code in codes), default=0)


def who_may_connect(settings: Settings) -> tuple[ServerTls | None, TokenFile | None] | None:
    """The port's TLS and the bearer tokens, read (and checked) at start; None (logged) if they
    do not load."""
    log = structlog.get_logger("quotad")
    try:
        tls = ServerTls(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls else None
        tokens = TokenFile(settings.tokens_file) if settings.tokens_file else None
    except (OSError, ValueError) as error:
        log.error("TLS or tokens refused", error=str(error))
        return None
    if tls is None:
        log.warning(
            "serving plaintext: set QUOTAD_TLS_CERT and QUOTAD_TLS_KEY outside development"
            + ("; bearer tokens travel in the clear" if tokens is not None else "")
        )
    return tls, tokens


def check_policy(path: str) -> int:
    try:
        policy = load_policy(path)
    except PolicyError as error:
        print(error, file=sys.stderr)
        return 1
    limits = sum(len(v) for v in policy.tier_limits.values())
    limits += sum(len(v) for v in policy.tenant_limits.values()) + len(policy.global_limits)
    print(f"{path}: OK ({len(policy.tier_limits)} tiers, {limits} limits)")
    return 0


def _dollars(micros_per_million: int) -> str:
    return f"${micros_per_million / 1_000_000:g}/M"


def _rates(price: Price) -> str:
    return (
        f"input {_dollars(price.input)}, cached input {_dollars(price.cached_input)},"
        f" cache write {_dollars(price.write_rate)}, output {_dollars(price.output)}"
    )


def show_price(model: str, policy_path: str | None) -> int:
    """Print what quotad applies to `model`: prices per service tier, context window, maximum
    output, tokenizer; with the policy's overrides when a policy file is given."""
    policy = None
    if policy_path:
        try:
            policy = load_policy(policy_path)
        except PolicyError as error:
            print(error, file=sys.stderr)
            return EXIT_CONFIG
    settings = policy.models.get(model) if policy else None
    use_catalog = policy.price_catalog if policy else True
    terms = resolve(Catalog() if use_catalog else None, model, settings)
    encoding = settings.encoding if settings else default_encoding(model)
    print(f"model: {model}")
    print(f"source: {terms.source or 'nothing known'}")
    print(f"tokenizer: {encoding or 'none (set models.<name>.encoding and calibration)'}")
    window = f"{terms.context_window} tokens" if terms.context_window else "unknown"
    print(f"context window: {window}")
    maximum = f"{terms.max_output_tokens} tokens" if terms.max_output_tokens is not None else "unknown"
    print(f"max output: {maximum}")
    for tier in ServiceTier:
        price = terms.price(tier)
        if price is None:
            continue
        line = f"{tier.value}: {_rates(price)}"
        if price.above is not None:
            line += f"; above {price.threshold} input tokens: {_rates(price.above)}"
        print(line)
    if not terms.prices:
        print("prices: none (set models.<name>.price in the policy)")
    return 0 if terms.source else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quotad", description="Quota decisions for LLM calls.")
    parser.add_argument("--version", action="version", version=f"quotad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve", help="serve gRPC (settings from QUOTAD_* environment variables)"
    )
    serve_parser.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port (SO_REUSEPORT); overrides QUOTAD_WORKERS",
    )
    check = commands.add_parser("check-policy", help="validate a policy file offline")
    check.add_argument("file")
    pricing = commands.add_parser(
        "price", help="show the prices, context window and maximum output that apply to a model"
    )
    pricing.add_argument("model")
    pricing.add_argument("--policy", help="a policy file whose models section overrides the catalog")
    prepare = commands.add_parser(
        "prepare-encodings", help="write the bundled tiktoken encodings into DIR (use as TIKTOKEN_CACHE_DIR)"
    )
    prepare.add_argument("dir")
    probe = commands.add_parser(
        "health", help="exit 0 if this pod's quotad is SERVING (over QUOTAD_LOCAL_SOCKET): for exec probes"
    )
    probe.add_argument("--service", default="", help="'liveness' for liveness; default: readiness")
    probe.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    hashing = commands.add_parser(
        "hash-token", help="read a bearer token on stdin; print its line for QUOTAD_TOKENS_FILE"
    )
    hashing.add_argument(
        "identity", help="the identity the token stands for, as the policy's callers name it"
    )
    args = parser.parse_args(argv)

    if args.command == "health":
        return health(os.environ, args.service, args.timeout)  # `quotad health` alone is served by entry.py
    if args.command == "hash-token":
        token = sys.stdin.readline().strip()
        if not token or " " in args.identity:
            print("quotad hash-token: a token on stdin, and an identity without spaces", file=sys.stderr)
            return EXIT_CONFIG
        print(f"{args.identity} {hash_token(token)}")
        return 0

    if args.command == "check-policy":
        return check_policy(args.file)
    if args.command == "price":
        return show_price(args.model, args.policy)
    if args.command == "prepare-encodings":
        prepare_cache(Path(args.dir))
        print(f"{args.dir}: cl100k_base, o200k_base ready; set TIKTOKEN_CACHE_DIR={args.dir}")
        return 0
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as error:
        print(f"quotad: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.workers is not None:
        if not 1 <= args.workers <= 64:
            print("quotad: --workers: expected 1 to 64", file=sys.stderr)
            return EXIT_CONFIG
        settings = dataclasses.replace(settings, workers=args.workers)
    configure_logging(settings.log_format, settings.log_level)
    try:
        load_policy(settings.policy_path)  # refuse a bad policy before starting anything
        if settings.workers > 1:
            return supervise(settings)
        return asyncio.run(serve(settings))
    except PolicyError as error:
        structlog.get_logger("quotad").error("policy refused", error=str(error))
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
