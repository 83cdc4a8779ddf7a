"""The Redis store: key layout, script registration and error wrapping.

Every decision is one script call (store/lua/*.lua). Values travel only in
KEYS and ARGV. Keys are built by `key()` alone: they carry a `{hash tag}`
derived from the decision's partition, so every key one script touches lives
in one Redis Cluster slot. Reservation ids embed that tag, so Commit and
Release find the reservation's slot from the id alone.
"""

from __future__ import annotations

import asyncio
import binascii
import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from quotad_server.errors import (
    AlreadySettled,
    DeadlineExceeded,
    FieldViolation,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    QuotadError,
    StoreUnavailable,
)
from quotad_server.model import (
    Algorithm,
    Calendar,
    Cost,
    Limit,
    LimitStatus,
    Metric,
    Price,
    Priority,
    Scope,
    SettleOutcome,
)
from quotad_server.store import ReservePlan, ReserveResult
from quotad_server.store.resp import (
    DRAIN_S,
    NOTHING,
    LateReply,
    Packed,
    RedisAddress,
    RedisClock,
    RedisReplyError,
    RespClient,
    Script,
    ScriptCall,
    TlsFiles,
)

T = TypeVar("T")
_log = structlog.get_logger("quotad.store")
Clock = Callable[[], int]
"""Returns now in microseconds. Tests inject one; in production the scripts read Redis TIME."""
LateObserver = Callable[[str], None]
"""Told what became of each reservation Redis made after quotad had answered UNAVAILABLE:
"undone", "held" (a retry holds it), or "stuck" (the undo failed; the lease frees it)."""

SCRIPT_MARGIN = 0.2
"""The part of a call's time kept for the reply's way back: a script gives up (writes nothing)
once 80% of its call's time has passed on Redis's clock, so that its reply can still arrive
before quotad answers UNAVAILABLE. A reply later still is a late reply (see RespClient), and a
reservation it made is undone."""
UNDO_BACKOFF_S = (0.1, 0.3, 1.0, 3.0, 10.0)
"""Pauses between the attempts to undo a late reservation while Redis stays unavailable."""

_ALGORITHM_CODE = {Algorithm.TOKEN_BUCKET: "b", Algorithm.SLIDING_WINDOW: "w", Algorithm.CONCURRENCY: "c"}
_CALENDAR_CODE = {Calendar.DAY: "d", Calendar.MONTH: "m"}
_METRIC_CODE = {
    Metric.REQUESTS: "r",
    Metric.INPUT_TOKENS: "i",
    Metric.OUTPUT_TOKENS: "o",
    Metric.TOTAL_TOKENS: "t",
    Metric.CONCURRENT: "c",
    Metric.COST_USD: "u",
}
_EXCLUDING_CACHED = {Metric.INPUT_TOKENS: "I", Metric.TOTAL_TOKENS: "T"}


@functools.lru_cache(maxsize=4096)
def _codes(limit: Limit) -> tuple[str, str]:
    """The (algorithm, metric) codes of a limit in the scripts' ARGV (see reserve.lua)."""
    algorithm = _CALENDAR_CODE[limit.calendar] if limit.calendar else _ALGORITHM_CODE[limit.algorithm]
    if limit.slices:  # a slice of a limit held in escrow (see escrow.lua): B or W
        algorithm = algorithm.upper()
    metric = _EXCLUDING_CACHED[limit.metric] if limit.exclude_cached else _METRIC_CODE[limit.metric]
    return algorithm, metric


_TAG_HEX = 8
RESERVATION_ID = re.compile(rf"^[0-9a-f]{{{_TAG_HEX + 32}}}$")

_REPLY_ALLOWED, _REPLY_DENIED, _REPLY_REPLAYED, _REPLY_QUEUE_FULL = 1, 0, 2, 3
_REPLY_NOT_FOUND, _REPLY_PAST_DEADLINE, _REPLY_FINGERPRINT, _REPLY_WRONG_STATE = 0, -1, -2, -3
_REPLY_FORBIDDEN = -4
_REPLY_UNDONE = 1


@functools.lru_cache(maxsize=65536)
def hash_tag(partition: str) -> str:
    """The Redis Cluster hash tag of a partition: short, fixed-size, any partition name; for an
    escrow partition 'p:<index>', a tag placed in the slot space (see _spread_tag)."""
    if partition.startswith("p:") and partition[2:].isdigit():
        return _spread_tag(int(partition[2:]))
    return hashlib.blake2b(partition.encode(), digest_size=_TAG_HEX // 2).hexdigest()


_SLOTS = 16384
_GOLDEN = (5**0.5 - 1) / 2


def _spread_tag(index: int) -> str:
    """The tag of escrow partition `index`: 8 hex digits whose Redis Cluster slot (CRC16 of the
    tag, binascii.crc_hqx) is the index-th point of the golden-ratio sequence over the slots.

    The N partitions of escrow carry every decision of a policy with global limits, so how they
    fall on a cluster's shards sets the fleet's ceiling. Hashed tags fall unevenly: 64 partitions
    on 3 shards split 27 / 17 / 20, the busiest shard 1.27 times its even share (1.41 on 6
    shards). The sequence's first N points leave gaps of at most three sizes, so any N partitions
    fall on any split of the slots into contiguous ranges (as clusters split them) within a few
    percent of even for N >= 32 (1.03 times on 3 and on 6 shards), and the points of the 1,024
    partitions escrow allows are distinct slots (so distinct tags).

    Found, not searched for: the tag is 5 hex digits A then 3 hex digits B, and CRC16 (no final
    XOR) is affine, crc(A + B) = crc(B) ^ crc(000, crc(A)). So for A = 00000, 00001, ... the B
    that lands on the slot (any of the 4 CRCs that are the slot mod 16,384) is looked up among
    the CRCs of the 4,096 B's: a few lookups per tag, not 16,384 CRCs.
    """
    target = int(index * _GOLDEN % 1.0 * _SLOTS)
    by_crc = _suffixes_by_crc()
    prefix = 0
    while True:
        head = f"{prefix:05x}".encode()
        shift = binascii.crc_hqx(b"\0\0\0", binascii.crc_hqx(head, 0))
        for crc in range(target, 1 << 16, _SLOTS):
            tail = by_crc.get(crc ^ shift)
            if tail is not None:
                return (head + tail).decode()
        prefix += 1


@functools.cache
def _suffixes_by_crc() -> dict[int, bytes]:
    """The first 3-hex-digit string with each CRC16 (of 4,096 strings): see _spread_tag."""
    found: dict[int, bytes] = {}
    for value in range(1 << 12):
        tail = f"{value:03x}".encode()
        found.setdefault(binascii.crc_hqx(tail, 0), tail)
    return found


def _escape(part: str) -> str:
    # ':' separates key parts; escape it (and the escape character) so that
    # tenant "a:b" + subject "c" and tenant "a" + subject "b:c" never share a key.
    return part.replace("%", "%25").replace(":", "%3A")


def key(prefix: str, tag: str, kind: str, *parts: str) -> str:
    """Build every key quotad uses: `<prefix>:{<tag>}:<kind>:<part>:...`."""
    return ":".join((prefix, "{" + tag + "}", kind, *(_escape(p) for p in parts)))


@functools.lru_cache(maxsize=1024)
def _price_arg(price: Price | None) -> str:
    return "0 0 0 0 0" if price is None else price.script_arg()


def _suffix(limit: Limit) -> str:
    """A limit's key after its owner's part: '<algorithm code>:<name>'.

    Sliding windows over requests that count the same requests (same owner and model
    filter) share one zset, 'wr' or 'wr:<model>' (see reserve.lua): a subject's
    requests/minute and requests/hour then cost one member per request. A shadow limit keeps
    a zset of its own: it is not charged when it would deny, the limits sharing one are.
    So does a slice of a limit held in escrow, 'W<slices>:<name>' ('B<slices>:<name>' for a
    bucket): its zset is its usage against its own capacity, and a change of the number of
    slices starts new slices.
    """
    algorithm, metric = _codes(limit)
    if limit.slices:
        return f"{algorithm}{limit.slices}:{_escape(limit.name)}"
    if algorithm == "w" and metric == "r" and not limit.shadow:
        return "wr" if limit.model is None else f"wr:{_escape(limit.model)}"
    return f"{algorithm}:{_escape(limit.name)}"


@dataclasses.dataclass(frozen=True, slots=True)
class _LimitSet:
    """What the scripts need about one tuple of limits, worked out once per tuple.

    Policy.limits_for hands out the same tuple for every request of a (tier, tenant,
    model), so this is looked up by the tuple's identity: no hashing of the limits
    on the hot path.
    """

    limits: tuple[Limit, ...]
    scopes: tuple[Scope, ...]
    suffixes: tuple[str, ...]
    args: Mapping[Priority, tuple[str, ...]]  # ARGV[14...] per priority (see reserve.lua), as sent
    packed: Mapping[Priority, Packed]  # the same, encoded once
    forced_args: Mapping[
        Priority, tuple[str, ...]
    ]  # the same with every limit forced: charged, never denying
    forced: Mapping[Priority, Packed]  # those, encoded once

    @classmethod
    def of(cls, limits: tuple[Limit, ...]) -> _LimitSet:
        args: dict[Priority, tuple[str, ...]] = {}
        forced: dict[Priority, tuple[str, ...]] = {}
        # The limits' modes (see reserve.lua), sent only when some limit is not simply enforced.
        modes = "".join("1" if limit.shadow else "0" for limit in limits)
        for priority in Priority:
            flat: list[Any] = [len(limits)]
            for limit in limits:
                flat += (*_codes(limit), limit.limit, limit.period_us, limit.admit_limit(priority))
            values = tuple(str(value) for value in flat)  # strings pack faster than ints
            args[priority] = (*values, modes) if "1" in modes else values
            forced[priority] = (*values, "2" * len(limits))
        return cls(
            limits,
            tuple(limit.scope for limit in limits),
            tuple(_suffix(limit) for limit in limits),
            args,
            {priority: Packed.of(values) for priority, values in args.items()},
            forced,
            {priority: Packed.of(values) for priority, values in forced.items()},
        )


# The first word of the error replies of a Redis that is up but cannot decide now: an outage
# to callers (UNAVAILABLE), not a bug. A script that gets one wrote nothing: Redis checks
# these before it runs a script or at its first write, and never fails a later write of a
# script that has written.
_SHARDED = (
    "it is one shard of a Redis Cluster and this decision's keys live on another;"
    " quotad needs a single primary (or a cluster of one shard)"
)
_CANNOT_SERVE = {
    "OOM": "out of memory (maxmemory reached; quotad needs maxmemory-policy noeviction and room)",
    "READONLY": "it is a read-only replica (a failover demoted it?)",
    "MASTERDOWN": "it is a replica that lost its primary",
    "LOADING": "it is loading its dataset",
    "BUSY": "it is busy running a script past its time limit",
    "MISCONF": "it refuses writes after failed snapshots (stop-writes-on-bgsave-error)",
    "NOREPLICAS": "it refuses writes with too few replicas (min-replicas-to-write)",
    "TRYAGAIN": "a cluster resharding is in progress",
    "CLUSTERDOWN": "its cluster is down",
    # A Redis Cluster of several shards: the decision's keys live on another node, and quotad's
    # client talks to one server (see cluster_shards). Refused at start; UNAVAILABLE if it happens later.
    "MOVED": _SHARDED,
    "ASK": _SHARDED,
}


class _RandomHex:
    """128 random bits as 32 hex digits, from os.urandom (as secrets.token_hex) read 4 KiB at a time.

    One getrandom system call per 256 reservation ids instead of one per decision: under
    load, that call alone took 3% of quotad's time (py-spy). For the event loop's thread
    only; a process started afresh (as workers are) starts with an empty pool.
    """

    _POOL = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        at = self._at
        if at + 16 > len(self._pool):
            self._pool, at = os.urandom(self._POOL), 0
        self._at = at + 16
        return self._pool[at : at + 16].hex()


class Connection(Protocol):
    """What RedisStore needs of its connection to Redis: RespClient (store/resp.py) for one server,
    GlideCluster (store/cluster.py) for a Redis Cluster of several shards. Every call has a deadline
    (`deadline()` by default) and raises ConnectionError, TimeoutError or RedisReplyError."""

    clock: RedisClock

    @property
    def in_doubt(self) -> int: ...

    def register(self, *scripts: Script) -> None: ...

    def deadline(self) -> float: ...

    async def sync_clock(self, deadline: float | None = None) -> None: ...

    async def call(self, *command: Any, deadline: float | None = None) -> Any: ...

    async def run_script(
        self,
        script: Script,
        keys: list[str],
        args: list[Any],
        tail: Packed = NOTHING,
        *,
        deadline: float | None = None,
        on_late: LateReply | None = None,
    ) -> Any: ...

    async def run_scripts(
        self,
        script: Script,
        calls: Sequence[ScriptCall],
        *,
        deadline: float | None = None,
        on_late: Sequence[LateReply | None] | None = None,
    ) -> list[Any]: ...

    def drop_connection(self, reason: Exception) -> None: ...

    async def subscribe(self, channel: str, on_message: Callable[[bytes], None]) -> None: ...

    async def aclose(self) -> None: ...


def _slice_arg(limits: tuple[Limit, ...], index: int) -> str:
    """The tail of reserve.lua's ARGV[13] when some limit is a slice: " <slice index> <slices>"."""
    for limit in limits:
        if limit.slices:
            return f" {index} {limit.slices}"
    return ""


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Address = TypeVar("_Address", bound="DataclassInstance")  # RedisAddress, or cluster.ClusterAddress


def _with_options(address: _Address, connection: Mapping[str, Any]) -> tuple[_Address, TlsFiles]:
    """The address with the password of `connection` (cli.redis_connection_options) if it has
    one, and its TLS files."""
    if connection.get("password"):
        address = dataclasses.replace(address, password=connection["password"])
    tls = TlsFiles(
        connection.get("ssl_ca_certs"), connection.get("ssl_certfile"), connection.get("ssl_keyfile")
    )
    return address, tls


def _tenants_arg(tenants: frozenset[str] | None) -> str:
    """settle.lua's ARGV[8]: the tenants whose reservations may be settled, or '*' for any."""
    return "*" if tenants is None else "\t".join(sorted(tenants))


def _load_script(name: str) -> str:
    return (resources.files("quotad_server.store") / "lua" / name).read_text(encoding="utf-8")


class RedisStore:
    """Store on Redis: one server (`from_url`), or a Redis Cluster of several shards (`cluster`).
    See the Store protocol."""

    def __init__(
        self,
        client: Connection,
        *,
        timeout_s: float,
        key_prefix: str = "quotad",
        clock: Clock | None = None,
        late_observer: LateObserver | None = None,
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._clock = clock
        self._late_observer = late_observer
        self._undoing: set[asyncio.Task[None]] = set()
        self._reserve = Script(_load_script("reserve.lua"))
        self._settle = Script(_load_script("settle.lua"))
        self._stats = Script(_load_script("stats.lua"))
        self._leave = Script(_load_script("leave.lua"))
        self._health = Script(_load_script("health.lua"))
        self._escrow = Script(_load_script("escrow.lua"))
        client.register(self._reserve, self._settle, self._stats, self._leave, self._health, self._escrow)
        self._random_hex = _RandomHex()
        self._limit_sets: dict[int, _LimitSet] = {}
        self._owners: dict[tuple[str, str], dict[Scope, str]] = {}  # (tag, tenant) -> key prefix per scope
        self._taker_capacity: dict[str, int] = {}  # escrow: slice key -> its capacity after its last take

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        key_prefix: str = "quotad",
        clock: Clock | None = None,
        late_observer: LateObserver | None = None,
        **connection: Any,
    ) -> RedisStore:
        """`connection`: password, ssl_ca_certs, ssl_certfile, ssl_keyfile (as cli.redis_connection_options)."""
        address, tls = _with_options(RedisAddress.from_url(url), connection)
        # No retries: a retried script may run twice; UNAVAILABLE is the honest answer.
        client = RespClient(address, timeout_s=timeout_s, tls=tls)
        return cls(
            client, timeout_s=timeout_s, key_prefix=key_prefix, clock=clock, late_observer=late_observer
        )

    @classmethod
    def cluster(
        cls,
        url: str,
        *,
        timeout_s: float,
        key_prefix: str = "quotad",
        clock: Clock | None = None,
        late_observer: LateObserver | None = None,
        **connection: Any,
    ) -> RedisStore:
        """A store on the Redis Cluster whose seed nodes `url` lists (`redis://h1:6379,h2:6379`),
        through valkey-glide (see store/cluster.py); `connection` as for from_url."""
        # Imported here: glide takes 0.4 s and 30 MB to import, which only a cluster needs.
        from quotad_server.store.cluster import ClusterAddress, GlideCluster  # noqa: PLC0415

        address, tls = _with_options(ClusterAddress.from_url(url), connection)
        client = GlideCluster(address, timeout_s=timeout_s, tls=tls)
        return cls(
            client, timeout_s=timeout_s, key_prefix=key_prefix, clock=clock, late_observer=late_observer
        )

    @property
    def follows_cluster(self) -> bool:
        """True when its client follows a Redis Cluster's slots (several shards are fine)."""
        return not isinstance(self._client, RespClient)

    # -- plumbing ---------------------------------------------------------------------

    def _as_store_error(self, error: Exception) -> Exception:
        """What a failed Redis call means to callers: StoreUnavailable, or the error itself (a bug).

        A server that has become a read-only replica also loses its connection here, so that
        the next call reconnects (see RespClient.drop_connection).
        """
        if isinstance(error, TimeoutError):  # the client dropped the connection; the next call reconnects
            return StoreUnavailable(f"redis did not answer within {self._timeout_s * 1000:.0f} ms")
        if isinstance(error, OSError):  # ConnectionError included
            return StoreUnavailable(f"redis unavailable: {error}")
        if not isinstance(error, RedisReplyError):
            return error
        code = str(error).split(" ", 1)[0]
        if code in ("NOAUTH", "WRONGPASS", "NOPERM"):
            return StoreUnavailable(f"redis refused quotad: not authenticated ({error})")  # misconfigured
        cannot_serve = _CANNOT_SERVE.get(code)
        if cannot_serve is None:
            return error  # a script bug or a wrong server: surfaces as UNKNOWN and is logged
        if code == "READONLY":
            self._client.drop_connection(ConnectionError("redis is a read-only replica now; reconnecting"))
        return StoreUnavailable(f"redis cannot serve: {cannot_serve} ({error})")

    async def _call(self, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except (OSError, RedisReplyError) as exc:  # TimeoutError is an OSError
            mapped = self._as_store_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(self._clock())

    async def _script_deadline(self, deadline: float) -> int:
        """The Redis-clock deadline (ARGV) of a script whose call gives up at `deadline` (loop time).

        SCRIPT_MARGIN of the call's time before it, so that the reply has time to come back.
        0 (none) under an injected clock: the scripts then run on that clock, not Redis's.
        """
        if self._clock is not None:
            return 0
        clock = self._client.clock
        if not clock.known:  # never connected yet: connecting samples Redis's clock
            await self._call(self._client.sync_clock(deadline))
        return clock.redis_us(deadline - self._timeout_s * SCRIPT_MARGIN)

    def _observe_clock(self, redis_now_us: int, sent: float) -> None:
        """A script's reply read Redis's clock between `sent` and now (loop time)."""
        if self._clock is None:
            self._client.clock.observe(redis_now_us, sent, asyncio.get_running_loop().time())

    async def _run(
        self,
        script: Script,
        keys: list[str],
        args: list[Any],
        tail: Packed = NOTHING,
        *,
        deadline: float | None = None,
        on_late: LateReply | None = None,
    ) -> list[Any]:
        reply: list[Any] = await self._call(
            self._client.run_script(script, keys, args, tail, deadline=deadline, on_late=on_late)
        )
        return reply

    async def _run_many(
        self,
        script: Script,
        calls: Sequence[ScriptCall],
        *,
        deadline: float | None = None,
        on_late: Sequence[LateReply | None] | None = None,
    ) -> list[Any]:
        """Every call in one pipeline; a failed one comes back as its exception, in its place."""
        if not calls:
            return []
        return await self._call(self._client.run_scripts(script, calls, deadline=deadline, on_late=on_late))

    def _unwrap(self, reply: Any) -> list[Any]:
        """One reply of a pipeline: its value, or its error raised as _call would raise it."""
        if isinstance(reply, Exception):
            mapped = self._as_store_error(reply)
            raise mapped from (None if mapped is reply else reply)
        result: list[Any] = reply
        return result

    def _record_key(self, tag: str, reservation_id: str) -> str:
        return (
            f"{self._prefix}:{{{tag}}}:r:{reservation_id}"  # key(prefix, tag, "r", id): ids need no escaping
        )

    def _limit_set(self, limits: tuple[Limit, ...]) -> _LimitSet:
        found = self._limit_sets.get(id(limits))
        if found is None or found.limits is not limits:
            if len(self._limit_sets) >= 10_000:  # limit tuples come and go with policy reloads
                self._limit_sets.clear()
            found = self._limit_sets[id(limits)] = _LimitSet.of(limits)
        return found

    def limit_keys(self, tag: str, limits: tuple[Limit, ...], tenant: str, subject: str) -> list[str]:
        """The counter key of each limit: `key(prefix, tag, "l", scope, *owner, algorithm, name)`."""
        compiled = self._limit_set(limits)
        owners = self._owners.get((tag, tenant))
        if owners is None:  # the subject's is completed below; the others are whole
            if len(self._owners) >= 10_000:
                self._owners.clear()
            owners = self._owners[(tag, tenant)] = {
                Scope.SUBJECT: key(self._prefix, tag, "l", "s", tenant, ""),
                Scope.TENANT: key(self._prefix, tag, "l", "t", tenant, ""),
                Scope.GLOBAL: key(self._prefix, tag, "l", "g", ""),
            }
        subject_owner = owners[Scope.SUBJECT] + _escape(subject) + ":"
        return [
            (subject_owner if scope is Scope.SUBJECT else owners[scope]) + suffix
            for scope, suffix in zip(compiled.scopes, compiled.suffixes, strict=True)
        ]

    @staticmethod
    def _statuses(limits: Sequence[Limit], reply: list[Any]) -> tuple[LimitStatus, ...]:
        # Redis returns Lua numbers as integers: no conversions needed.
        statuses = []
        at = 4
        for limit in limits:
            wait = reply[at + 2]
            statuses.append(LimitStatus(limit, reply[at], reply[at + 1], None if wait < 0 else wait))
            at += 3
        return tuple(statuses)

    # -- the Store protocol -----------------------------------------------------------

    async def start(self) -> None:
        """Connect and learn Redis's clock; raise StoreUnavailable if Redis is down."""
        await self._call(self._client.sync_clock())

    async def ping(self) -> None:
        """Redis can decide now: it runs a script that writes (see health.lua).

        Its clock is sampled on the way, so the estimate stays fresh while no decision is made.
        """
        sent = asyncio.get_running_loop().time()
        seconds, micros = await self._run(self._health, [key(self._prefix, "health", "probe")], [10_000])
        self._observe_clock(int(seconds) * 1_000_000 + int(micros), sent)

    async def cluster_shards(self) -> int | None:
        """0 if Redis is not a Cluster, else how many shards serve its slots; None if it does not say.

        quotad's client talks to one server: in a cluster of several shards, the keys of some
        decisions live on another node (MOVED). Best effort, as for eviction_policy.
        """
        enabled = await self._server_field(("INFO", "cluster"), "cluster_enabled")
        if enabled != "1":
            return None if enabled is None else 0
        size = await self._server_field(("CLUSTER", "INFO"), "cluster_size")
        return int(size) if size is not None and size.isdigit() else None

    async def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy, from INFO (which managed services allow where CONFIG is not).

        Anything but noeviction may drop live counters under memory pressure, every key of
        quotad having a TTL. None if the server does not say: a proxy without INFO, a user
        whose ACL denies it, or no answer. Only advice hangs on it, never a decision.
        """
        return await self._server_field(("INFO", "memory"), "maxmemory_policy")

    async def _server_field(self, command: tuple[str, ...], field: str) -> str | None:
        """One `field:value` line of an INFO-like reply; None if the server does not say."""
        try:
            text: bytes = await self._call(self._client.call(*command))
        except (StoreUnavailable, RedisReplyError):
            return None
        for line in text.decode(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return value.strip()
        return None

    async def aclose(self) -> None:
        """Close the connections, after giving the undos in progress a few timeouts to finish."""
        try:
            await asyncio.wait_for(self.quiesce(), 4 * self._timeout_s)
        except TimeoutError:
            for task in self._undoing:
                task.cancel()
        await self._client.aclose()

    def _reserve_call(self, plan: ReservePlan, script_deadline: int) -> tuple[str, ScriptCall]:
        tag = hash_tag(plan.partition)
        reservation_id = tag + self._random_hex()
        record_key = self._record_key(tag, reservation_id)
        idempotency_key = (
            key(self._prefix, tag, "i", plan.tenant, plan.subject, plan.idempotency_key)
            if plan.idempotency_key
            else record_key  # unused by the script; any key of the same slot will do
        )
        keys = [
            record_key,
            idempotency_key,
            *self.limit_keys(tag, plan.limits, plan.counted_as, plan.subject),
        ]
        args: list[Any] = [
            "reserve",
            self._now_arg(),
            script_deadline,
            reservation_id,
            plan.lease_us,
            max(1, plan.record_ttl_us // 1000),
            plan.fingerprint,
            plan.input_tokens,
            plan.output_tokens,
            plan.cost_micro_usd,
            _price_arg(plan.price),
            f"{plan.model}\t{plan.tier}\t{plan.tenant}\t{plan.max_output_tokens}",
            f"{plan.ticket or '-'} {plan.boost_us} {int(plan.enqueue)} {plan.max_line} {plan.ticket_ttl_ms}"
            + _slice_arg(plan.limits, plan.slice_index),
        ]
        compiled = self._limit_set(plan.limits)
        tail = (compiled.forced if plan.forced else compiled.packed)[plan.priority]
        return reservation_id, (keys, args, tail)

    def _reserve_result(self, plan: ReservePlan, reservation_id: str, reply: list[Any]) -> ReserveResult:
        code, lease_expires_us = reply[0], reply[2]
        if code == _REPLY_PAST_DEADLINE:
            raise StoreUnavailable("redis ran the decision after the caller's deadline; nothing was reserved")
        if code == _REPLY_FINGERPRINT:
            raise IdempotencyKeyReused(
                "idempotency_key was already used for a different request by this subject; use a new key"
            )
        if code == _REPLY_REPLAYED:
            first_id, input_tokens, output_tokens, cost = reply[4].decode(), reply[5], reply[6], reply[7]
            return ReserveResult(
                allowed=True,
                reservation_id=first_id,
                lease_expires_at_us=lease_expires_us,
                limits=(),
                replayed=True,
                reserved=Cost(1, int(input_tokens), int(output_tokens), cost_micro_usd=int(cost)),
            )
        allowed = code == _REPLY_ALLOWED
        at = 4 + 3 * len(plan.limits)  # after the statuses: the waiting line, its rank, spare capacity
        line_index = reply[at] if len(reply) > at else 0
        line, rank, spare = "", 0, False
        if line_index:
            line = self.limit_keys(hash_tag(plan.partition), plan.limits, plan.counted_as, plan.subject)[
                line_index - 1
            ]
            line += ":q"
            rank, spare = reply[at + 1], reply[at + 2] == 1
        return ReserveResult(
            allowed=allowed,
            queue_full=code == _REPLY_QUEUE_FULL,
            line=line,
            rank=rank,
            spare=spare,
            reservation_id=reservation_id if allowed else "",
            lease_expires_at_us=lease_expires_us if allowed else 0,
            limits=self._statuses(plan.limits, reply),
            reserved=Cost(1, plan.input_tokens, plan.output_tokens, cost_micro_usd=plan.cost_micro_usd)
            if allowed
            else None,
        )

    def reserve_command(self, plan: ReservePlan) -> tuple[str, str, list[str], list[Any]]:
        """(script SHA, reservation id, KEYS, ARGV) of the EVALSHA reserve() sends: for tools."""
        reservation_id, (keys, args, _) = self._reserve_call(plan, 0)
        compiled = self._limit_set(plan.limits)
        tail = (compiled.forced_args if plan.forced else compiled.args)[plan.priority]
        return self._reserve.sha.decode(), reservation_id, keys, [*args, *tail]

    async def reserve(self, plan: ReservePlan) -> ReserveResult:
        deadline, callers = self._client.deadline(), False
        if plan.deadline is not None and plan.deadline < deadline:  # the caller's comes first
            deadline, callers = plan.deadline, True
        reservation_id, (keys, args, tail) = self._reserve_call(plan, await self._script_deadline(deadline))
        sent = asyncio.get_running_loop().time()
        on_late = functools.partial(self._late_reservation, plan, reservation_id, keys[1])
        try:
            reply = await self._run(self._reserve, keys, args, tail, deadline=deadline, on_late=on_late)
            self._observe_clock(reply[1], sent)
            return self._reserve_result(plan, reservation_id, reply)
        except StoreUnavailable as error:
            if callers and (isinstance(error.__cause__, TimeoutError) or error.__cause__ is None):
                raise DeadlineExceeded(
                    "the caller's deadline passed before redis decided; nothing was reserved"
                ) from error
            raise

    async def reserve_many(self, plans: Sequence[ReservePlan]) -> list[ReserveResult | QuotadError]:
        deadline = min([self._client.deadline(), *(p.deadline for p in plans if p.deadline is not None)])
        script_deadline = await self._script_deadline(deadline) if plans else 0
        calls = [self._reserve_call(plan, script_deadline) for plan in plans]
        hooks: list[LateReply | None] = [
            functools.partial(self._late_reservation, plan, reservation_id, call[0][1])
            for plan, (reservation_id, call) in zip(plans, calls, strict=True)
        ]
        replies = await self._run_many(
            self._reserve, [call for _, call in calls], deadline=deadline, on_late=hooks
        )
        results: list[ReserveResult | QuotadError] = []
        for plan, (reservation_id, _), reply in zip(plans, calls, replies, strict=True):
            try:
                results.append(self._reserve_result(plan, reservation_id, self._unwrap(reply)))
            except QuotadError as error:
                results.append(error)
        return results

    # -- late replies: a reservation nobody holds is undone ---------------------------------

    def _late_reservation(
        self, plan: ReservePlan, reservation_id: str, idempotency_key: str, reply: Any
    ) -> None:
        """The reply of a reserve whose caller was already answered UNAVAILABLE (or went away).

        Called from the connection's reader: it only looks, and leaves the undo to a task.
        A reservation it made, or handed out again (an idempotent replay), is held by
        nobody: undo it, unless a later retry has claimed it since (settle.lua decides).
        """
        if not isinstance(reply, list):
            return  # an error reply: the script wrote nothing
        code = reply[0]
        if code == _REPLY_ALLOWED:
            target, claims = reservation_id, 0
        elif code == _REPLY_REPLAYED and len(reply) > 8 and reply[8] >= 0:
            target, claims = reply[4].decode(), reply[8]
        else:
            return  # denied or past its deadline: nothing reserved (a waiting place expires by itself)
        task = asyncio.get_running_loop().create_task(
            self._undo(target, idempotency_key, claims, plan.record_ttl_us), name="quotad-undo"
        )
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def _undo(self, reservation_id: str, idempotency_key: str, claims: int, ttl_us: int) -> None:
        """Undo a reservation nobody holds, retrying while Redis is unavailable.

        Nobody waits for this call, so it has no script deadline (an undo is right whenever it
        runs: settle.lua checks the claims) and all the time a retired connection has to answer.
        """
        record_key = self._record_key(reservation_id[:_TAG_HEX], reservation_id)
        args = ["undo", self._now_arg(), 0, claims, 0, 0, max(1, ttl_us // 1000), "*"]
        loop = asyncio.get_running_loop()
        for pause in (*UNDO_BACKOFF_S, None):
            try:
                reply = await self._run(
                    self._settle, [record_key, idempotency_key], args, deadline=loop.time() + DRAIN_S
                )
            except StoreUnavailable as error:
                if pause is not None:
                    await asyncio.sleep(pause)
                    continue
                _log.error(
                    "could not undo a reservation made after quotad answered UNAVAILABLE;"
                    " its lease frees its concurrency slots, its tokens stay charged",
                    reservation_id=reservation_id,
                    error=str(error),
                )
                self._observe_late("stuck")
                return
            undone = reply[0] == _REPLY_UNDONE
            _log.warning(
                "redis made a reservation after quotad had answered UNAVAILABLE"
                + ("; undone" if undone else "; a retry holds it"),
                reservation_id=reservation_id,
            )
            self._observe_late("undone" if undone else "held")
            return

    def _observe_late(self, outcome: str) -> None:
        if self._late_observer is not None:
            self._late_observer(outcome)

    async def quiesce(self) -> None:
        """Wait until no late reply is still to come and no undo is in progress (shutdown, tests).

        A late reply stops being awaited when it comes, or when its connection is lost or
        ends its drain (RespClient.DRAIN_S); so, however Redis fails, this returns.
        """
        while self._undoing or self._client.in_doubt:
            if self._undoing:
                await asyncio.gather(*self._undoing, return_exceptions=True)
            else:
                await asyncio.sleep(0.01)

    async def peek(
        self, partition: str, tenant: str, subject: str, limits: tuple[Limit, ...], slice_index: int = 0
    ) -> tuple[LimitStatus, ...]:
        tag = hash_tag(partition)
        keys = [
            self._record_key(tag, "peek"),
            self._record_key(tag, "peek"),
            *self.limit_keys(tag, limits, tenant, subject),
        ]
        args = [
            "peek",
            self._now_arg(),
            0,
            "",
            0,
            1,
            "",
            0,
            0,
            0,
            "0 0 0",
            "",
            "- 0 0 0 3000" + _slice_arg(limits, slice_index),
        ]
        sent = asyncio.get_running_loop().time()
        reply = await self._run(self._reserve, keys, args, self._limit_set(limits).packed[Priority.HIGH])
        self._observe_clock(reply[1], sent)
        return self._statuses(limits, reply)

    def _settle_call(
        self,
        reservation_id: str,
        actual: Cost | None,
        retention_us: int,
        script_deadline: int,
        tenants: frozenset[str] | None,
    ) -> ScriptCall:
        if not RESERVATION_ID.match(reservation_id):
            raise InvalidRequest(
                [FieldViolation("reservation_id", "malformed: expected the id CheckAndReserve returned")]
            )
        used = actual or Cost()
        keys = [self._record_key(reservation_id[:_TAG_HEX], reservation_id)]
        args = [
            "release" if actual is None else "commit",
            self._now_arg(),
            script_deadline,
            used.input_tokens,
            used.output_tokens,
            used.cached_input_tokens,
            max(1, retention_us // 1000),
            _tenants_arg(tenants),
            used.cache_write_input_tokens,
        ]
        return keys, args, NOTHING

    @staticmethod
    def _settle_result(reservation_id: str, reply: list[Any]) -> SettleOutcome:
        code, est_in, est_out, act_in, act_out, lease_expired, state, est_cost, act_cost, act_cached, meta = (
            reply[:11]
        )
        act_written = int(reply[11]) if len(reply) > 11 else 0
        if code == _REPLY_NOT_FOUND:
            raise NotFound(f"reservation {reservation_id} does not exist or is past its retention")
        if code == _REPLY_PAST_DEADLINE:
            raise StoreUnavailable("redis ran the settlement after the caller's deadline; nothing changed")
        if code == _REPLY_WRONG_STATE:
            done = "committed" if state == b"c" else "released"
            raise AlreadySettled(f"reservation {reservation_id} was already {done}")
        if code == _REPLY_FORBIDDEN:
            raise PermissionDenied(f"reservation {reservation_id} is not one this caller may settle")
        committed = state == b"c"
        model, tier, _, max_output = [*meta.decode().split("\t"), "", "", "", ""][:4]
        return SettleOutcome(
            reserved=Cost(1, int(est_in), int(est_out), cost_micro_usd=int(est_cost)),
            committed=Cost(1, int(act_in), int(act_out), int(act_cached), int(act_cost), act_written)
            if committed
            else Cost(),
            repeat=code != _REPLY_ALLOWED,
            lease_expired=bool(lease_expired),
            model=model,
            tier=tier,
            max_output_tokens=int(max_output) if max_output.isdigit() else None,
        )

    async def settle(
        self,
        reservation_id: str,
        actual: Cost | None,
        retention_us: int,
        tenants: frozenset[str] | None = None,
    ) -> SettleOutcome:
        deadline = self._client.deadline()
        script_deadline = await self._script_deadline(deadline)
        call = self._settle_call(reservation_id, actual, retention_us, script_deadline, tenants)
        reply = await self._run(self._settle, *call, deadline=deadline)
        return self._settle_result(reservation_id, reply)

    async def commit_many(
        self, commits: Sequence[tuple[str, Cost]], retention_us: int, tenants: frozenset[str] | None = None
    ) -> list[SettleOutcome | QuotadError]:
        results: list[SettleOutcome | QuotadError | None] = []
        calls: list[ScriptCall] = []
        deadline = self._client.deadline()
        script_deadline = await self._script_deadline(deadline) if commits else 0
        for reservation_id, actual in commits:
            try:
                calls.append(
                    self._settle_call(reservation_id, actual, retention_us, script_deadline, tenants)
                )
                results.append(None)
            except QuotadError as error:
                results.append(error)
        replies = iter(await self._run_many(self._settle, calls, deadline=deadline))
        done: list[SettleOutcome | QuotadError] = []
        for (reservation_id, _), result in zip(commits, results, strict=True):
            if result is not None:
                done.append(result)
                continue
            try:
                done.append(self._settle_result(reservation_id, self._unwrap(next(replies))))
            except QuotadError as error:
                done.append(error)
        return done

    # -- usage statistics (their own hash tag: they steer estimates, never admission) ----

    def _stats_key(self, model: str, tier: str) -> str:
        return key(self._prefix, "stats", "s", model, tier)

    async def record_usage(self, groups: Sequence[tuple[str, str, int, Mapping[str, int]]]) -> None:
        calls: list[ScriptCall] = []
        for model, tier, window, fields in groups:
            args: list[Any] = [window]
            for field, increment in fields.items():
                args += (field, increment)
            calls.append(([self._stats_key(model, tier)], args, NOTHING))
        for reply in await self._run_many(self._stats, calls):
            if isinstance(reply, Exception):
                self._unwrap(reply)

    async def read_usage_stats(self, model: str, tier: str) -> dict[str, int]:
        raw = await self._call(self._client.call("HGETALL", self._stats_key(model, tier)))
        return {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}

    # -- waiting lines ------------------------------------------------------------------

    async def leave_line(self, partition: str, ticket: str) -> None:
        ticket_key = key(self._prefix, hash_tag(partition), "w", ticket)
        await self._run(self._leave, [ticket_key], [ticket])

    async def watch_wakeups(self, wake: Callable[[str], None]) -> None:
        channel = f"{self._prefix}:wake"
        await self._client.subscribe(channel, lambda data: wake(data.decode()))

    # -- escrow: moving a global limit's capacity between its slices (see escrow.lua) ----

    @staticmethod
    def _slice_suffix(limit: Limit, tenant: str) -> str:
        """A slice's key without '<prefix>:{tag}:l:' (as limit_keys builds it): a global limit's,
        or `tenant`'s for a tenant limit."""
        if limit.scope is Scope.TENANT:
            return f"t:{_escape(tenant)}:{_suffix(limit)}"
        return f"g:{_suffix(limit)}"

    def _slice_key(self, partition: str, limit: Limit, tenant: str = "") -> str:
        return key(self._prefix, hash_tag(partition), "l", "") + self._slice_suffix(limit, tenant)

    def _transfers_key(self, partition: str) -> str:
        return key(self._prefix, hash_tag(partition), "e", "out")

    def _mark_key(self, partition: str, transfer: str) -> str:
        return key(self._prefix, hash_tag(partition), "e", "in", transfer)

    @staticmethod
    def _mark_ttl_ms(timeout_us: int) -> int:
        # A mark outlives every take that could still arrive (takes give up past the timeout).
        return max(60_000, 10 * timeout_us // 1000)

    async def rebalance(
        self,
        limit: Limit,
        partitions: Sequence[str],
        taker: int,
        keep: int,
        timeout_us: int,
        *,
        need: int = 0,
        tenant: str = "",
    ) -> int:
        """Move the capacity the other slices of `limit` (`tenant`'s, for a tenant limit) do not
        use, less `keep` units each, to the slice of partition `taker`, and have busier slices owe
        it up to `need` units (or its capacity, if more) for their usage to free (see escrow.lua);
        returns the units moved.

        Three pipelined rounds of single-slot calls: give (every other slice), take, and the
        transfer records' removal. A round that fails leaves its transfers to recover_transfers.
        """
        algorithm, metric = _codes(limit)
        count, suffix = len(partitions), self._slice_suffix(limit, tenant)
        spec = [algorithm, metric, limit.limit, limit.period_us]
        now = self._now_arg()
        givers = [index for index in range(count) if index != taker]
        ids = {index: self._random_hex()[:16] for index in givers}
        taker_key = self._slice_key(partitions[taker], limit, tenant)
        # The taker's capacity as its last take left it (at first, 0: unknown): givers above it
        # owe it half the difference (see escrow.lua), so busy slices converge to equal shares.
        seen = self._taker_capacity.get(taker_key, 0)
        gives: list[ScriptCall] = [
            (
                [self._slice_key(partitions[g], limit, tenant), self._transfers_key(partitions[g])],
                [
                    "give",
                    now,
                    *spec,
                    g,
                    count,
                    keep,
                    ids[g],
                    taker,
                    limit.limit,
                    suffix,
                    seen,
                    max(need, seen),
                ],
                NOTHING,
            )
            for g in givers
        ]
        given = [
            (g, self._unwrap(reply))
            for g, reply in zip(givers, await self._run_many(self._escrow, gives), strict=True)
        ]
        given = [(g, reply) for g, reply in given if reply[0] > 0]
        if not given:
            return 0
        ttl = self._mark_ttl_ms(timeout_us)
        takes: list[ScriptCall] = [
            (
                [taker_key, self._mark_key(partitions[taker], ids[g])],
                ["take", now, *spec, taker, count, ids[g], reply[0], limit.limit, reply[1], timeout_us, ttl],
                NOTHING,
            )
            for g, reply in given
        ]
        took = [self._unwrap(reply) for reply in await self._run_many(self._escrow, takes)]
        taken = [reply[0] for reply in took]
        if len(self._taker_capacity) > 10_000:
            self._taker_capacity.clear()
        self._taker_capacity[taker_key] = max(reply[2] for reply in took)
        done: list[ScriptCall] = [
            (
                [self._slice_key(partitions[g], limit, tenant), self._transfers_key(partitions[g])],
                ["reclaim", now, ids[g], 1, g],
                NOTHING,
            )
            for (g, _), units in zip(given, taken, strict=True)
            if units > 0  # a take that came too late is given back by recover_transfers
        ]
        for reply in await self._run_many(self._escrow, done):
            self._unwrap(reply)
        return int(sum(taken))

    async def recover_transfers(self, partitions: Sequence[str], timeout_us: int) -> int:
        """Settle every transfer older than `timeout_us` (its replica died, or a call of it failed):
        cancel it at its taker, and give it back to its giver unless the taker received it.
        Returns the units given back."""
        now = self._now_arg()
        found = await self._run_many(
            self._escrow,
            [([self._transfers_key(p)], ["stale", now, timeout_us], NOTHING) for p in partitions],
        )
        stale: list[tuple[int, str, list[str]]] = []  # (giver, id, record fields)
        for giver, reply in enumerate(found):
            pairs = self._unwrap(reply)
            for at in range(0, len(pairs), 2):
                stale.append((giver, pairs[at].decode(), pairs[at + 1].decode().split(" ", 8)))
        if not stale:
            return 0
        ttl = self._mark_ttl_ms(timeout_us)
        cancels: list[ScriptCall] = [
            ([self._mark_key(partitions[int(record[0])], transfer)], ["cancel", now, ttl], NOTHING)
            for _, transfer, record in stale
        ]
        received = [self._unwrap(reply)[0] for reply in await self._run_many(self._escrow, cancels)]
        reclaims: list[ScriptCall] = [
            (
                [
                    key(self._prefix, hash_tag(partitions[giver]), "l", "") + record[8],
                    self._transfers_key(partitions[giver]),
                ],
                ["reclaim", now, transfer, got, giver],
                NOTHING,
            )
            for (giver, transfer, record), got in zip(stale, received, strict=True)
        ]
        returned = [self._unwrap(reply)[0] for reply in await self._run_many(self._escrow, reclaims)]
        if any(returned):
            _log.warning(
                "gave back escrow capacity left in flight", transfers=len(stale), units=sum(returned)
            )
        return int(sum(returned))
