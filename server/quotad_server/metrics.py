"""Prometheus metrics: what quotad decided, what it charged, how fast it and Redis answered.

Everything lives in one `Metrics` object with its own registry, built by the
composition root only when QUOTAD_METRICS_LISTEN is set, and served on its own
port. The rest of the code reaches it through three seams, so that neither the
decision core nor the store imports prometheus_client:

- `InstrumentedCore`  a QuotaCore that records each outcome after deciding it;
- `InstrumentedStore` a Store wrapper that times every call and counts failures;
- `Metrics.rpc_finished` the servicer's RpcObserver hook (one call per RPC);
- `Metrics.policy_reload` the policy watcher's ReloadRecorder hook.

Labels are bounded by the policy, never by callers: no subject or tenant label,
and a model outside the policy's `models` list is counted as "other".

Counters and histograms are quotad's own lock-free ones (fastmetrics), updated by
the event loop alone. With `--workers N`, the supervising process serves the port:
`MetricsEndpoint.for_workers` reads every worker's metrics at each scrape.
"""

from __future__ import annotations

import platform
import socket
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Gauge,
    Info,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from quotad_server import __version__
from quotad_server.auth import ANONYMOUS, Caller
from quotad_server.core import Hits, QuotaCore, ReserveRequest
from quotad_server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    QuotadError,
    StoreUnavailable,
)
from quotad_server.fastmetrics import Counter, CounterChild, Histogram, HistogramChild
from quotad_server.model import Cost, Decision, Limit, LimitStatus, ReserveOutcome, SettleOutcome
from quotad_server.policy import Policy
from quotad_server.reload import PolicyHolder
from quotad_server.store import ReservePlan, ReserveResult, Store

T = TypeVar("T")

OTHER_MODEL = "other"
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_REDIS_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_RATIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
# A store's answers, not its failures (DeadlineExceeded: the caller's deadline, not Redis, ended it).
_ANSWERS = (FailedPrecondition, InvalidRequest, NotFound, DeadlineExceeded, PermissionDenied)


class _PolicyLimits(Collector):
    """`quotad_policy_limit` and `_period_seconds`, read from the policy in force at scrape time.

    So a dashboard can draw spend against the limit, and a reload shows at once.
    """

    _LABELS = ("limit", "scope", "owner", "metric", "model")

    def __init__(self, holder: PolicyHolder) -> None:
        self._holder = holder

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # unchecked collector: its series change with the policy

    def collect(self) -> Iterator[GaugeMetricFamily]:
        policy = self._holder.policy
        limit_family = GaugeMetricFamily(
            "quotad_policy_limit",
            "A limit of the policy in force, in its metric's units.",
            labels=self._LABELS,
        )
        period_family = GaugeMetricFamily(
            "quotad_policy_limit_period_seconds",
            "The period of a rate limit of the policy in force (concurrency limits have none).",
            labels=self._LABELS,
        )
        groups: list[tuple[str, tuple[Limit, ...]]] = [
            *policy.tier_limits.items(),
            *policy.tenant_limits.items(),
            ("", policy.global_limits),
        ]
        for owner, limits in groups:
            for limit in limits:
                labels = [limit.name, limit.scope.value, owner, limit.metric.value, limit.model or ""]
                limit_family.add_metric(labels, limit.limit)
                if limit.period_us:
                    period_family.add_metric(labels, limit.period_us / 1_000_000)
        yield limit_family
        yield period_family


class Metrics:
    """Every quotad metric, in a registry of its own (so several servers can share a process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
        Info("quotad_build", "The running quotad.", registry=registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.decisions = Counter(
            "quotad_decisions",
            "CheckAndReserve decisions (replays excluded); binding_limit and reason are empty when allowed.",
            ["decision", "reason", "tier", "model", "binding_limit"],
            registry=registry,
        )
        self.replays = Counter(
            "quotad_reservations_replayed",
            "CheckAndReserve retries answered with the first reservation (idempotency key).",
            registry=registry,
        )
        self.tokens_reserved = Counter(
            "quotad_tokens_reserved",
            "Tokens reserved by allowed decisions: the estimate (input tokens, max output tokens).",
            ["type", "tier", "model"],
            registry=registry,
        )
        self.tokens_committed = Counter(
            "quotad_tokens_committed",
            "Tokens actually used, as reported by Commit (first Commit of a reservation only).",
            ["type"],
            registry=registry,
        )
        self.tokens_refunded = Counter(
            "quotad_tokens_refunded",
            "Tokens given back: the estimate minus the actual at Commit (when below), the whole"
            " estimate at Release.",
            ["type"],
            registry=registry,
        )
        self.cost = Counter(
            "quotad_cost_micro_usd",
            "Money in micro-dollars, from the policy's prices: reserved by allowed decisions (the"
            " estimate), committed (the actual), refunded (estimate minus actual, or all at Release).",
            ["kind", "model"],
            registry=registry,
        )
        self.settlements = Counter(
            "quotad_settlements",
            "Reservations settled (first Commit or Release of each; repeats excluded).",
            ["method"],
            registry=registry,
        )
        self.late_settlements = Counter(
            "quotad_late_settlements",
            "Settlements that arrived after the reservation's lease had expired: its concurrency slot"
            " had already been freed unconfirmed. Reservations never settled at all are not seen here.",
            ["method"],
            registry=registry,
        )
        self.estimation_ratio = Histogram(
            "quotad_commit_actual_to_estimate_ratio",
            "At Commit, actual tokens divided by the reserved estimate (skipped when the estimate is 0).",
            ["type"],
            buckets=_RATIO_BUCKETS,
            registry=registry,
        )
        self.rpc_duration = Histogram(
            "quotad_rpc_duration_seconds",
            "Time to answer a QuotaService or Envoy ShouldRateLimit RPC, by method and gRPC status code.",
            ["method", "code"],
            buckets=_RPC_BUCKETS,
            registry=registry,
        )
        self.redis_duration = Histogram(
            "quotad_redis_call_duration_seconds",
            "Time of one store call (one Lua script or PING on Redis), successful or not.",
            ["operation"],
            buckets=_REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            "quotad_redis_errors",
            "Store calls that failed: timeout (no answer in QUOTAD_REDIS_TIMEOUT_MS), connection,"
            " deadline (Redis ran the script too late, so it wrote nothing) or error (anything else).",
            ["operation", "reason"],
            registry=registry,
        )
        self.late_reservations = Counter(
            "quotad_late_reservations",
            "Reservations Redis made after quotad had answered UNAVAILABLE (their reply came too late),"
            " by what quotad did: undone, held (an idempotent retry holds it), or stuck (the undo"
            " failed; the lease frees its concurrency slots, its tokens stay charged).",
            ["outcome"],
            registry=registry,
        )
        self.refusals = Counter(
            "quotad_refusals",
            "Calls and batch or stream items refused to their caller, by method and code: UNAUTHENTICATED"
            " (no identity where the policy names callers, or a bad token) or PERMISSION_DENIED (a method,"
            " tenant or tier the policy does not give it). Each also writes one line to the quotad.audit log.",
            ["method", "code"],
            registry=registry,
        )
        self.shadow_denials = Counter(
            "quotad_shadow_denials",
            "Requests admitted that a shadow limit would have denied (and was not charged for), by"
            " limit name and scope: what enforcing the limit would deny. Each also names the limit in"
            " its RPC's log line (shadow_denied).",
            ["limit", "scope"],
            registry=registry,
        )
        self.impossible_usage = Counter(
            "quotad_impossible_usage",
            "Commits that reported more output tokens than the call's max_output_tokens allowed: no"
            " provider returns that, so the caller's usage (or its max_tokens) is wrong. Charged all the same.",
            ["model"],
            registry=registry,
        )
        for outcome in ("undone", "held", "stuck"):
            self.late_reservations.labels(outcome)  # every series exists from the start, at zero
        self.policy_reloads = Counter(
            "quotad_policy_reloads",
            "Attempts to apply a changed policy file; failure means it was refused and the old one stays.",
            ["result"],
            registry=registry,
        )
        self.policy_loaded_at = Gauge(
            "quotad_policy_loaded_timestamp_seconds",
            "When the policy in force was loaded (Unix time).",
            registry=registry,
        )
        self.policy_info = Gauge(
            "quotad_policy_info",
            "Always 1; sha256 labels the policy file in force (compare replicas with it).",
            ["sha256"],
            registry=registry,
        )
        for result in ("success", "failure"):
            self.policy_reloads.labels(result)  # both series exist from the start, at zero
        # The series of the per-decision metrics by label values, found with one dict lookup per
        # update. Bounded like the labels themselves.
        self._rpc: dict[tuple[str, str], HistogramChild] = {}
        self._redis: dict[str, HistogramChild] = {}
        self._decided: dict[
            tuple[str, str, str, str, str], tuple[CounterChild, CounterChild | None, CounterChild | None]
        ] = {}

    def watch_policy(self, holder: PolicyHolder) -> None:
        """Export the limits of `holder.policy` (read again at each scrape)."""
        self.registry.register(_PolicyLimits(holder))

    # -- hooks ----------------------------------------------------------------------------

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        """The servicer's RpcObserver: one call per RPC, with its final status code."""
        child = self._rpc.get((method, code))
        if child is None:
            child = self._rpc[method, code] = self.rpc_duration.labels(method, code)
        child.observe(seconds)

    def policy_loaded(self, digest: str) -> None:
        """The policy whose file hashes to `digest` is now in force."""
        self.policy_info.clear()
        self.policy_info.labels(digest).set(1)
        self.policy_loaded_at.set(time.time())

    def policy_reload(self, ok: bool, digest: str) -> None:
        """The policy watcher's ReloadRecorder: a changed file was applied (ok) or refused."""
        self.policy_reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.policy_loaded(digest)

    def decided(self, policy: Policy, model: str, outcome: ReserveOutcome) -> None:
        if outcome.replayed:
            self.replays.inc()
            return
        if outcome.decision is Decision.ALLOWED:
            for status in outcome.limits:
                if status.shadow_denied:
                    self.shadow_denials.labels(status.limit.name, status.limit.scope.value).inc()
        model_label = model if model in policy.models else (OTHER_MODEL if model else "")
        reason = outcome.deny_reason.value if outcome.deny_reason is not None else ""
        key = (outcome.decision.value, reason, outcome.tier, model_label, outcome.binding_limit or "")
        children = self._decided.get(key)
        if children is None:
            allowed = outcome.decision is Decision.ALLOWED  # denials reserve no tokens: no series for them
            children = self._decided[key] = (
                self.decisions.labels(*key),
                self.tokens_reserved.labels("input", outcome.tier, model_label) if allowed else None,
                self.tokens_reserved.labels("output", outcome.tier, model_label) if allowed else None,
            )
        decisions, reserved_input, reserved_output = children
        decisions.inc()
        if reserved_input is not None and reserved_output is not None and outcome.reserved is not None:
            reserved_input.inc(outcome.reserved.input_tokens)
            reserved_output.inc(outcome.reserved.output_tokens)
            if outcome.reserved.cost_micro_usd:
                self.cost.labels("reserved", model_label).inc(outcome.reserved.cost_micro_usd)

    def settled(self, method: str, outcome: SettleOutcome) -> None:
        if outcome.repeat:
            return
        self.settlements.labels(method).inc()
        if outcome.impossible_usage:
            self.impossible_usage.labels(outcome.model or "").inc()
        if outcome.lease_expired:
            self.late_settlements.labels(method).inc()
        reserved, committed = outcome.reserved, outcome.committed
        model_label = outcome.model or ""
        if method == "release":
            if reserved.cost_micro_usd:
                self.cost.labels("refunded", model_label).inc(reserved.cost_micro_usd)
            self.tokens_refunded.labels("input").inc(reserved.input_tokens)
            self.tokens_refunded.labels("output").inc(reserved.output_tokens)
            return
        pairs = (
            ("input", reserved.input_tokens, committed.input_tokens),
            ("output", reserved.output_tokens, committed.output_tokens),
        )
        for kind, estimate, actual in pairs:
            self.tokens_committed.labels(kind).inc(actual)
            if actual < estimate:
                self.tokens_refunded.labels(kind).inc(estimate - actual)
            if estimate > 0:
                self.estimation_ratio.labels(kind).observe(actual / estimate)
        if reserved.cost_micro_usd or committed.cost_micro_usd:
            self.cost.labels("committed", model_label).inc(committed.cost_micro_usd)
            if committed.cost_micro_usd < reserved.cost_micro_usd:
                self.cost.labels("refunded", model_label).inc(
                    reserved.cost_micro_usd - committed.cost_micro_usd
                )
        total_estimate = reserved.input_tokens + reserved.output_tokens
        if total_estimate > 0:
            total_actual = committed.input_tokens + committed.output_tokens
            self.estimation_ratio.labels("total").observe(total_actual / total_estimate)

    def refused(self, method: str, code: str) -> None:
        """The servicer's RpcObserver: a call or item refused to its caller."""
        self.refusals.labels(method, code).inc()

    def late_reservation(self, outcome: str) -> None:
        """The store's LateObserver: what became of a reservation made after quotad gave up on it."""
        self.late_reservations.labels(outcome).inc()

    def store_call(self, operation: str, seconds: float, error: BaseException | None) -> None:
        child = self._redis.get(operation)
        if child is None:
            child = self._redis[operation] = self.redis_duration.labels(operation)
        child.observe(seconds)
        if error is None:
            return
        if isinstance(error, StoreUnavailable):
            cause = error.__cause__
            reason = "timeout" if isinstance(cause, TimeoutError) else "connection" if cause else "deadline"
        else:
            reason = "error"
        self.redis_errors.labels(operation, reason).inc()


class InstrumentedCore(QuotaCore):
    """A QuotaCore that records every outcome in `metrics` after deciding it (and changes none)."""

    def __init__(self, *args: Any, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = metrics

    async def check_and_reserve(self, request: ReserveRequest) -> ReserveOutcome:
        policy = self.policy  # the policy this decision is made under, even if a reload lands meanwhile
        outcome = await super().check_and_reserve(request)
        self._metrics.decided(policy, request.model, outcome)
        return outcome

    async def decide_hits(self, request: ReserveRequest, hits: Hits) -> ReserveOutcome:
        policy = self.policy
        outcome = await super().decide_hits(request, hits)
        self._metrics.decided(policy, request.model, outcome)
        return outcome

    async def check_and_reserve_many(
        self, requests: Sequence[ReserveRequest]
    ) -> list[ReserveOutcome | QuotadError]:
        policy = self.policy
        outcomes = await super().check_and_reserve_many(requests)
        for request, outcome in zip(requests, outcomes, strict=True):
            if not isinstance(outcome, QuotadError):
                self._metrics.decided(policy, request.model, outcome)
        return outcomes

    async def commit(
        self,
        reservation_id: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        caller: Caller = ANONYMOUS,
        *,
        cache_write_input_tokens: int = 0,
    ) -> SettleOutcome:
        outcome = await super().commit(
            reservation_id,
            input_tokens,
            output_tokens,
            cached_input_tokens,
            caller,
            cache_write_input_tokens=cache_write_input_tokens,
        )
        self._metrics.settled("commit", outcome)
        return outcome

    async def commit_many(
        self,
        commits: Sequence[tuple[str, int, int, int] | tuple[str, int, int, int, int]],
        caller: Caller = ANONYMOUS,
    ) -> list[SettleOutcome | QuotadError]:
        outcomes = await super().commit_many(commits, caller)
        for outcome in outcomes:
            if not isinstance(outcome, QuotadError):
                self._metrics.settled("commit", outcome)
        return outcomes

    async def release(self, reservation_id: str, caller: Caller = ANONYMOUS) -> SettleOutcome:
        outcome = await super().release(reservation_id, caller)
        self._metrics.settled("release", outcome)
        return outcome


class InstrumentedStore:
    """A Store that times every call to `inner` and counts its failures. Answers are unchanged.

    NotFound, FailedPrecondition, InvalidRequest and DeadlineExceeded are answers, not failures:
    not counted.
    """

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def _done(self, operation: str, started: float, error: BaseException | None) -> None:
        if isinstance(error, _ANSWERS):
            error = None
        self._metrics.store_call(operation, time.perf_counter() - started, error)

    # Each timed call returns `_timed`'s coroutine itself: one coroutine per call, not two.

    def reserve(self, plan: ReservePlan) -> Coroutine[Any, Any, ReserveResult]:
        return self._timed("reserve", self._inner.reserve(plan))

    def peek(
        self, partition: str, tenant: str, subject: str, limits: tuple[Limit, ...], slice_index: int = 0
    ) -> Coroutine[Any, Any, tuple[LimitStatus, ...]]:
        return self._timed("peek", self._inner.peek(partition, tenant, subject, limits, slice_index))

    def rebalance(
        self,
        limit: Limit,
        partitions: Sequence[str],
        taker: int,
        keep: int,
        timeout_us: int,
        *,
        need: int = 0,
        tenant: str = "",
    ) -> Coroutine[Any, Any, int]:
        call = self._inner.rebalance(limit, partitions, taker, keep, timeout_us, need=need, tenant=tenant)
        return self._timed("rebalance", call)

    def recover_transfers(self, partitions: Sequence[str], timeout_us: int) -> Coroutine[Any, Any, int]:
        return self._timed("recover_transfers", self._inner.recover_transfers(partitions, timeout_us))

    def settle(
        self,
        reservation_id: str,
        actual: Cost | None,
        retention_us: int,
        tenants: frozenset[str] | None = None,
    ) -> Coroutine[Any, Any, SettleOutcome]:
        return self._timed("settle", self._inner.settle(reservation_id, actual, retention_us, tenants))

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await call
        except Exception as error:
            self._done(operation, started, error)
            raise
        self._done(operation, started, None)
        return result

    def reserve_many(
        self, plans: Sequence[ReservePlan]
    ) -> Coroutine[Any, Any, list[ReserveResult | QuotadError]]:
        return self._timed("reserve_many", self._inner.reserve_many(plans))

    def commit_many(
        self, commits: Sequence[tuple[str, Cost]], retention_us: int, tenants: frozenset[str] | None = None
    ) -> Coroutine[Any, Any, list[SettleOutcome | QuotadError]]:
        return self._timed("commit_many", self._inner.commit_many(commits, retention_us, tenants))

    def record_usage(
        self, groups: Sequence[tuple[str, str, int, Mapping[str, int]]]
    ) -> Coroutine[Any, Any, None]:
        return self._timed("record_usage", self._inner.record_usage(groups))

    def read_usage_stats(self, model: str, tier: str) -> Coroutine[Any, Any, dict[str, int]]:
        return self._timed("read_usage_stats", self._inner.read_usage_stats(model, tier))

    def leave_line(self, partition: str, ticket: str) -> Coroutine[Any, Any, None]:
        return self._timed("leave_line", self._inner.leave_line(partition, ticket))

    async def watch_wakeups(self, wake: Callable[[str], None]) -> None:
        await self._inner.watch_wakeups(wake)

    def ping(self) -> Coroutine[Any, Any, None]:
        return self._timed("ping", self._inner.ping())

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Workers(Collector):
    """The metrics of every worker process of `quotad serve --workers N`, read at each scrape.

    Each worker serves its own metrics on a loopback port; every series is passed on with a
    `worker` label (its index), so sums are `sum without (worker) (...)`. A worker that does
    not answer in time is left out of that scrape, and `quotad_worker_up` says so.
    """

    def __init__(self, ports: Sequence[int], timeout_s: float) -> None:
        self._ports = tuple(ports)
        self._timeout_s = timeout_s

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: its series are the workers'

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "quotad_worker_up",
            "1 if the worker's metrics were read at this scrape, else 0.",
            labels=["worker"],
        )
        families: dict[str, Metric] = {}
        for index, port in enumerate(self._ports):
            worker = str(index)
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=self._timeout_s
                ) as reply:
                    text = reply.read().decode()
            except OSError:
                up.add_metric([worker], 0)
                continue
            up.add_metric([worker], 1)
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                merged.samples += [s._replace(labels={**s.labels, "worker": worker}) for s in family.samples]
        yield up
        yield from families.values()


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged, as with prometheus_client's own server."""


def _serve_on(listener: socket.socket, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` at /metrics on a socket that is already bound and listening."""
    server = _ThreadingServer(listener.getsockname()[:2], _QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    server.server_address = listener.getsockname()
    server.server_name, server.server_port = str(server.server_address[0]), int(server.server_address[1])
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="quotad-metrics", daemon=True)
    thread.start()
    return server, thread


def _bind(listen: str) -> socket.socket:
    """A listening socket on `host:port` (an IPv6 host in brackets; an empty host is every IPv4 one)."""
    host, _, port = listen.rpartition(":")
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]") or "0.0.0.0", int(port), type=socket.SOCK_STREAM
    )[0]
    return socket.create_server(address, family=family)


class MetricsEndpoint:
    """The /metrics HTTP endpoint on its own port, served by a daemon thread."""

    def __init__(
        self, metrics: Metrics | CollectorRegistry, listen: str, *, listener: socket.socket | None = None
    ) -> None:
        registry = metrics.registry if isinstance(metrics, Metrics) else metrics
        self._server, self._thread = _serve_on(_bind(listen) if listener is None else listener, registry)
        self.port: int = self._server.server_port

    @classmethod
    def on_inherited(cls, metrics: Metrics, fd: int) -> MetricsEndpoint:
        """A worker's endpoint, on the listening socket its supervisor bound and handed down as `fd`."""
        return cls(metrics, "", listener=socket.socket(fileno=fd))

    @classmethod
    def for_workers(cls, ports: Sequence[int], listen: str, timeout_s: float = 2.0) -> MetricsEndpoint:
        """The endpoint of `quotad serve --workers N`: every worker's metrics, from `ports`."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_Workers(ports, timeout_s))
        return cls(registry, listen)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
