"""The Redis store: key layout, script registration and error wrapping.

Every decision is one script call (store/lua/*.lua). Values travel only in
KEYS and ARGV. Keys are built by `key()` alone: they carry a `{hash tag}`
derived from the decision's partition, so every key one script touches lives
in one Redis Cluster slot. Reservation ids embed that tag, so Commit and
Release find the reservation's slot from the id alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from quotad_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
)
from quotad_server.model import Algorithm, Cost, Limit, LimitStatus, Metric, Scope, SettleOutcome
from quotad_server.store import ReservePlan, ReserveResult

T = TypeVar("T")
Clock = Callable[[], int]
"""Returns now in microseconds. Tests inject one; in production the scripts read Redis TIME."""

_ALGORITHM_CODE = {Algorithm.TOKEN_BUCKET: "b", Algorithm.SLIDING_WINDOW: "w", Algorithm.CONCURRENCY: "c"}
_METRIC_CODE = {
    Metric.REQUESTS: "r",
    Metric.INPUT_TOKENS: "i",
    Metric.OUTPUT_TOKENS: "o",
    Metric.TOTAL_TOKENS: "t",
    Metric.CONCURRENT: "c",
}
_SCOPE_CODE = {Scope.SUBJECT: "s", Scope.TENANT: "t", Scope.GLOBAL: "g"}
_TAG_HEX = 8
RESERVATION_ID = re.compile(rf"^[0-9a-f]{{{_TAG_HEX + 32}}}$")

_REPLY_ALLOWED, _REPLY_DENIED, _REPLY_REPLAYED = 1, 0, 2
_REPLY_NOT_FOUND, _REPLY_PAST_DEADLINE, _REPLY_FINGERPRINT, _REPLY_WRONG_STATE = 0, -1, -2, -3


def hash_tag(partition: str) -> str:
    """The Redis Cluster hash tag of a partition: short, fixed-size, any partition name."""
    return hashlib.blake2b(partition.encode(), digest_size=_TAG_HEX // 2).hexdigest()


def _escape(part: str) -> str:
    # ':' separates key parts; escape it (and the escape character) so that
    # tenant "a:b" + subject "c" and tenant "a" + subject "b:c" never share a key.
    return part.replace("%", "%25").replace(":", "%3A")


def key(prefix: str, tag: str, kind: str, *parts: str) -> str:
    """Build every key quotad uses: `<prefix>:{<tag>}:<kind>:<part>:...`."""
    return ":".join((prefix, "{" + tag + "}", kind, *(_escape(p) for p in parts)))


def _load_script(name: str) -> str:
    return (resources.files("quotad_server.store") / "lua" / name).read_text(encoding="utf-8")


class RedisStore:
    """Store on one Redis (or Redis-compatible) server. See the Store protocol."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        timeout_s: float,
        key_prefix: str = "quotad",
        clock: Clock | None = None,
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._clock = clock
        self._reserve: AsyncScript = client.register_script(_load_script("reserve.lua"))
        self._settle: AsyncScript = client.register_script(_load_script("settle.lua"))
        # Redis clock minus ours, in microseconds; learnt from every script reply. It turns
        # our timeout into a deadline on Redis's clock, after which a script that was
        # delayed (a paused or overloaded server) gives up instead of acting on a request
        # whose caller was already told UNAVAILABLE.
        self._offset_us: int | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        key_prefix: str = "quotad",
        clock: Clock | None = None,
        **connection: Any,
    ) -> RedisStore:
        """`connection` passes redis-py options through: password, ssl_ca_certs, ssl_certfile, ssl_keyfile."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # A retried script may run twice; an error is the honest answer.
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            **connection,
        )
        return cls(client, timeout_s=timeout_s, key_prefix=key_prefix, clock=clock)

    # -- plumbing ---------------------------------------------------------------------

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await operation()
        except TimeoutError as exc:
            raise StoreUnavailable(f"redis did not answer within {self._timeout_s * 1000:.0f} ms") from exc
        except ResponseError:
            raise  # a script bug or a wrong server: not an outage, let it surface as one
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(self._clock())

    def _deadline_arg(self) -> int:
        if self._clock is not None or self._offset_us is None:
            return 0
        return time.time_ns() // 1000 + self._offset_us + int(self._timeout_s * 1_000_000)

    def _learn_clock(self, redis_now_us: int) -> None:
        if self._clock is None:
            self._offset_us = redis_now_us - time.time_ns() // 1000

    async def _run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        reply: list[Any] = await self._call(lambda: script(keys=list(keys), args=list(args)))
        return reply

    def _record_key(self, tag: str, reservation_id: str) -> str:
        return key(self._prefix, tag, "r", reservation_id)

    def limit_key(self, tag: str, limit: Limit, tenant: str, subject: str) -> str:
        owner: tuple[str, ...]
        if limit.scope is Scope.SUBJECT:
            owner = (tenant, subject)
        elif limit.scope is Scope.TENANT:
            owner = (tenant,)
        else:
            owner = ()
        return key(
            self._prefix,
            tag,
            "l",
            _SCOPE_CODE[limit.scope],
            *owner,
            _ALGORITHM_CODE[limit.algorithm],
            limit.name,
        )

    @staticmethod
    def _limit_args(limits: Sequence[Limit]) -> list[Any]:
        args: list[Any] = [len(limits)]
        for limit in limits:
            args += (
                _ALGORITHM_CODE[limit.algorithm],
                _METRIC_CODE[limit.metric],
                limit.limit,
                limit.period_us,
            )
        return args

    @staticmethod
    def _statuses(limits: Sequence[Limit], reply: list[Any]) -> tuple[LimitStatus, ...]:
        statuses = []
        for index, limit in enumerate(limits):
            remaining, reset_after, wait = reply[4 + 3 * index : 7 + 3 * index]
            statuses.append(
                LimitStatus(limit, int(remaining), int(reset_after), None if wait < 0 else int(wait))
            )
        return tuple(statuses)

    # -- the Store protocol -----------------------------------------------------------

    async def start(self) -> None:
        """Load the scripts and learn Redis's clock; raise StoreUnavailable if Redis is down."""
        await self._call(self._client.ping)
        seconds, micros = await self._call(self._client.time)
        self._learn_clock(seconds * 1_000_000 + micros)

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def reserve(self, plan: ReservePlan) -> ReserveResult:
        tag = hash_tag(plan.partition)
        reservation_id = tag + secrets.token_hex(16)
        idempotency_key = key(self._prefix, tag, "i", plan.tenant, plan.subject, plan.idempotency_key)
        keys = [
            self._record_key(tag, reservation_id),
            idempotency_key,
            *(self.limit_key(tag, limit, plan.tenant, plan.subject) for limit in plan.limits),
        ]
        args = [
            "reserve",
            self._now_arg(),
            self._deadline_arg(),
            reservation_id,
            plan.lease_us,
            max(1, plan.record_ttl_us // 1000),
            plan.fingerprint,
            plan.input_tokens,
            plan.output_tokens,
            *self._limit_args(plan.limits),
        ]
        reply = await self._run(self._reserve, keys, args)
        code, now_us, lease_expires_us = reply[0], reply[1], reply[2]
        self._learn_clock(now_us)
        if code == _REPLY_PAST_DEADLINE:
            raise StoreUnavailable("redis ran the decision after the caller's deadline; nothing was reserved")
        if code == _REPLY_FINGERPRINT:
            raise FailedPrecondition(
                "idempotency_key was already used for a different request by this subject; use a new key"
            )
        if code == _REPLY_REPLAYED:
            first_id, input_tokens, output_tokens = reply[4].decode(), reply[5], reply[6]
            return ReserveResult(
                allowed=True,
                reservation_id=first_id,
                lease_expires_at_us=lease_expires_us,
                limits=(),
                replayed=True,
                reserved=Cost(1, int(input_tokens), int(output_tokens)),
            )
        allowed = code == _REPLY_ALLOWED
        return ReserveResult(
            allowed=allowed,
            reservation_id=reservation_id if allowed else "",
            lease_expires_at_us=lease_expires_us if allowed else 0,
            limits=self._statuses(plan.limits, reply),
            reserved=Cost(1, plan.input_tokens, plan.output_tokens) if allowed else None,
        )

    async def peek(
        self, partition: str, tenant: str, subject: str, limits: tuple[Limit, ...]
    ) -> tuple[LimitStatus, ...]:
        tag = hash_tag(partition)
        keys = [
            self._record_key(tag, "peek"),
            self._record_key(tag, "peek"),
            *(self.limit_key(tag, limit, tenant, subject) for limit in limits),
        ]
        args = ["peek", self._now_arg(), 0, "", 0, 1, "", 0, 0, *self._limit_args(limits)]
        reply = await self._run(self._reserve, keys, args)
        self._learn_clock(reply[1])
        return self._statuses(limits, reply)

    async def settle(self, reservation_id: str, actual: Cost | None, retention_us: int) -> SettleOutcome:
        if not RESERVATION_ID.match(reservation_id):
            raise InvalidRequest(
                [FieldViolation("reservation_id", "malformed: expected the id CheckAndReserve returned")]
            )
        mode = "release" if actual is None else "commit"
        used = actual or Cost()
        keys = [self._record_key(reservation_id[:_TAG_HEX], reservation_id)]
        args = [
            mode,
            self._now_arg(),
            self._deadline_arg(),
            used.input_tokens,
            used.output_tokens,
            max(1, retention_us // 1000),
        ]
        reply = await self._run(self._settle, keys, args)
        code, est_in, est_out, act_in, act_out, lease_expired, state = reply
        if code == _REPLY_NOT_FOUND:
            raise NotFound(f"reservation {reservation_id} does not exist or is past its retention")
        if code == _REPLY_PAST_DEADLINE:
            raise StoreUnavailable("redis ran the settlement after the caller's deadline; nothing changed")
        if code == _REPLY_WRONG_STATE:
            done = "committed" if state == b"c" else "released"
            raise FailedPrecondition(f"reservation {reservation_id} was already {done}")
        committed = state == b"c"
        return SettleOutcome(
            reserved=Cost(1, int(est_in), int(est_out)),
            committed=Cost(1, int(act_in), int(act_out)) if committed else Cost(),
            repeat=code != _REPLY_ALLOWED,
            lease_expired=bool(lease_expired),
        )
