"""A small auto-pipelining Redis client: one connection, one write per event-loop turn.

Every command issued during one turn of the event loop is written to the socket
in one write, and the replies are matched to their callers in order (RESP
replies arrive in request order). Under load, concurrent decisions coalesce
into one pipeline per turn: one syscall and one round trip for many scripts,
with the protocol encoded and parsed in C by hiredis.

Only what quotad needs: connect (TCP, TLS or a Unix socket; AUTH, SELECT),
commands, scripts by SHA with NOSCRIPT fallback. Errors: ConnectionError when
the connection fails or is lost, TimeoutError when Redis does not answer in
time, RedisReplyError for an error reply.

Deadlines, and what happens after them. Every call has its own deadline, which
covers connecting too. A watchdog fails each call that is past its own deadline,
and only those: a call sent a moment ago keeps its time. A failed call stays in
its place in the line of replies, so when its reply comes after all (a paused or
slow Redis), the caller's `on_late` hears it: the store undoes a reservation that
nobody holds (see RedisStore). A connection that has heard nothing for a whole
timeout while calls were waiting is retired: new calls go to a new connection,
and the old one stays open to hear its late replies, for `DRAIN_S` at most.
Closing it at once would lose those replies, and with them the knowledge of what
a script that ran did.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
import structlog

_log = structlog.get_logger("quotad.redis")


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (a bug or a misconfiguration, not an outage)."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect, parsed from a redis://, rediss:// or unix:// URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        username = unquote(parsed.username) if parsed.username else None
        password = unquote(parsed.password) if parsed.password else None
        if parsed.scheme == "unix":
            return cls(
                path=parsed.path, username=username, password=password, db=int(query.get("db", ["0"])[0])
            )
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r}")
        db = int(parsed.path.lstrip("/") or query.get("db", ["0"])[0])
        return cls(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 6379,
            tls=parsed.scheme == "rediss",
            username=username,
            password=password,
            db=db,
        )


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Files for rediss:// connections: a CA bundle to verify the server, a client certificate and key."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(frozen=True, slots=True)
class Packed:
    """Command arguments encoded once, sent as they are after a command's own arguments.

    For what many commands repeat: a script's constant arguments (the limits of a policy)
    are encoded once, not on every call.
    """

    count: int
    data: bytes
    values: tuple[str, ...] = ()  # the arguments themselves, for a client that encodes its own (glide)

    @classmethod
    def of(cls, args: Sequence[Any]) -> Packed:
        if not args:
            return NOTHING
        packed = hiredis.pack_command(tuple(args))
        values = tuple(str(arg) for arg in args)
        return cls(len(args), packed[packed.index(b"\r\n") + 2 :], values)  # without the "*<count>" header


NOTHING = Packed(0, b"")


def pack(command: tuple[Any, ...], tail: Packed = NOTHING) -> bytes:
    """The RESP encoding of `command` followed by the arguments in `tail`."""
    packed: bytes = hiredis.pack_command(command)
    if not tail.count:
        return packed
    header = b"*%d\r\n" % (len(command) + tail.count)
    return b"".join((header, memoryview(packed)[packed.index(b"\r\n") + 2 :], tail.data))


class Script:
    """A Lua script, called by SHA; the client loads it at connect (see RespClient.register), and on NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


LateReply = Callable[[Any], None]
"""Told the reply of a call that its caller no longer waits for (past its deadline, or cancelled)."""

DRAIN_S = 30.0
"""How long a retired connection stays open to hear the late replies of the calls it carried."""
MAX_RETIRED = 64
"""Retired connections kept open at most (a long outage retires one per timeout)."""


class RedisClock:
    """Redis's clock (TIME) as seen from the event loop's clock, as NTP filters its samples.

    Each sample brackets Redis's reading between the local send and receive times, so
    its error is at most half its round trip. The sample with the shortest round trip
    wins, not the latest: under load, or when the event loop lags, replies are read
    late, and a latest-sample estimate would move deadlines by that lag. A best sample
    ages by AGING_US per second, so a newer one of nearly the same quality takes over
    and the estimate follows drift between the two clocks.
    """

    AGING_US = 100.0

    def __init__(self) -> None:
        self._offset_us: float | None = None  # Redis microseconds minus loop-clock microseconds
        self._error_us = float("inf")
        self._at = 0.0

    def observe(self, redis_us: int, sent: float, received: float) -> None:
        """A reading `redis_us` of Redis's clock, taken between `sent` and `received` (loop time)."""
        error_us = (received - sent) * 500_000
        if error_us > self._error_us + (sent - self._at) * self.AGING_US:
            return
        self._offset_us = redis_us - (sent + received) * 500_000
        self._error_us, self._at = error_us, sent

    @property
    def known(self) -> bool:
        return self._offset_us is not None

    def redis_us(self, loop_time: float) -> int:
        """The Redis-clock microseconds at `loop_time`; the clock must be known."""
        assert self._offset_us is not None, "no sample of Redis's clock yet"
        return int(loop_time * 1_000_000 + self._offset_us)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # (future, sent at, deadline, on_late): the calls whose replies are still to come, in order.
        self._pending: deque[tuple[asyncio.Future[Any], float, float, LateReply | None]] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.heard_at = self._loop.time()
        self.lost: BaseException | None = None  # why no new call may use it
        self.closed = False  # the socket is gone: no more replies
        self.retired_at: float | None = None
        self.on_push: Callable[[Any], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self.heard_at = self._loop.time()
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if self.on_push is not None:  # a subscribed connection: every reply is a push
                self.on_push(reply)
                continue
            future, _, _, on_late = self._pending.popleft()
            if not future.done():
                future.set_result(reply)
            elif on_late is not None:  # its caller gave up (deadline) or went away (cancelled)
                on_late(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.lost is None:
            self.lost = exc or ConnectionError("connection closed by Redis")
        if self.on_push is not None:
            self.on_push(None)  # the subscriber's end of messages
        error = ConnectionError(f"lost the Redis connection: {self.lost}")
        while self._pending:
            future = self._pending.popleft()[0]
            if not future.done():
                future.set_exception(error)

    def expire(self, now: float, error: Exception) -> None:
        """Fail every call past its deadline; they keep their place for their late replies."""
        for future, _, deadline, _ in self._pending:
            if deadline <= now and not future.done():
                future.set_exception(error)

    def silent_for(self, now: float) -> float:
        """How long a call has been waiting with nothing heard from Redis meanwhile."""
        if not self._pending:
            return 0.0
        return now - max(self.heard_at, self._pending[0][1])

    @property
    def in_doubt(self) -> int:
        """Calls with an `on_late` hook, failed or cancelled, whose replies are still to come."""
        return sum(1 for future, _, _, on_late in self._pending if on_late is not None and future.done())

    @property
    def waiting(self) -> bool:
        """True while a reply is still to come (for a live or a failed call)."""
        return bool(self._pending)

    def send(self, payload: bytes, deadline: float, on_late: LateReply | None = None) -> asyncio.Future[Any]:
        if self.lost is not None or self._transport is None:
            raise ConnectionError(f"the Redis connection is closed: {self.lost}")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((future, self._loop.time(), deadline, on_late))
        self._outgoing.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def send_unanswered(self, payload: bytes) -> None:
        """Write a command whose replies arrive as pushes (SUBSCRIBE)."""
        if self._transport is not None:
            self._transport.write(payload)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self._outgoing and self.lost is None:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


ScriptCall = tuple[list[str], list[Any], Packed]
"""One call of a script: KEYS, then ARGV as `args` followed by the packed tail."""


class RespClient:
    """One lazily (re)connected, auto-pipelined connection to Redis.

    Every call either answers or fails by its deadline (by default `timeout_s` from the
    call's start; connecting included), give or take one watchdog tick (a twentieth of it).
    `clock` learns Redis's clock at every connect and from every sample a caller shows it.
    """

    def __init__(self, address: RedisAddress, *, timeout_s: float, tls: TlsFiles | None = None) -> None:
        self._address = address
        self._timeout_s = timeout_s
        self._connect_timeout_s = max(1.0, 4 * timeout_s)
        self._tls = tls or TlsFiles()
        self._protocol: _Protocol | None = None
        self._retired: deque[_Protocol] = deque()
        self._attempt: asyncio.Future[_Protocol] | None = None
        self._scripts: tuple[Script, ...] = ()
        self._watchdog: asyncio.Task[None] | None = None
        self.clock = RedisClock()

    @property
    def in_doubt(self) -> int:
        """Calls with an `on_late` hook, failed or cancelled, whose replies may still come."""
        return sum(protocol.in_doubt for protocol in (self._protocol, *self._retired) if protocol is not None)

    def register(self, *scripts: Script) -> None:
        """Load these scripts at every connect, so that calls find them (no NOSCRIPT round trip)."""
        self._scripts += scripts

    def deadline(self) -> float:
        """The deadline of a call that starts now (event-loop time)."""
        return asyncio.get_running_loop().time() + self._timeout_s

    async def _connection(self, deadline: float) -> _Protocol:
        """The live connection, or a new one: callers wait for it until their own deadline.

        One attempt to connect at a time, with a time of its own whoever waits for it:
        callers that give up do not leave half-made connections behind in the server's
        backlog (a paused Redis would see one per call otherwise), and a Redis slower than
        the timeout can still be reached, for work that waits longer (undos).
        """
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="quotad-redis-watchdog")
        attempt = self._attempt
        if attempt is None or attempt.done():
            connect_by = asyncio.get_running_loop().time() + self._connect_timeout_s
            attempt = self._attempt = asyncio.ensure_future(self._connect(connect_by))
            attempt.add_done_callback(self._connected)
        async with asyncio.timeout_at(deadline):
            return await asyncio.shield(attempt)

    def _connected(self, attempt: asyncio.Future[_Protocol]) -> None:
        if not attempt.cancelled() and attempt.exception() is None:
            self._protocol = attempt.result()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        error = TimeoutError(f"redis did not answer within {self._timeout_s * 1000:.0f} ms")
        while True:
            await asyncio.sleep(self._timeout_s / 20)
            now = loop.time()
            protocol = self._protocol
            if protocol is not None:
                protocol.expire(now, error)
                if protocol.silent_for(now) > self._timeout_s:
                    self._retire(ConnectionError("redis has been silent for a whole timeout; reconnecting"))
            for retired in self._retired:
                retired.expire(now, error)
            while self._retired and (
                not self._retired[0].waiting
                or self._retired[0].closed
                or now - (self._retired[0].retired_at or now) > DRAIN_S
                or len(self._retired) > MAX_RETIRED
            ):
                self._retired.popleft().abort()

    def _retire(self, reason: Exception) -> None:
        """Send new calls to a new connection; keep this one open to hear its late replies."""
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        protocol.lost = reason  # no new calls on it
        protocol.retired_at = asyncio.get_running_loop().time()
        self._retired.append(protocol)

    async def _connect(self, deadline: float) -> _Protocol:
        async with asyncio.timeout_at(deadline):
            return await self._open(deadline)

    async def _open(self, deadline: float) -> _Protocol:
        loop = asyncio.get_running_loop()
        address = self._address
        if address.path is not None:
            _, protocol = await loop.create_unix_connection(_Protocol, address.path)
        else:
            context = self._tls.context() if address.tls else None
            _, protocol = await loop.create_connection(
                _Protocol,
                address.host,
                address.port,
                ssl=context,
                server_hostname=address.host if context else None,
            )
        loads: list[asyncio.Future[Any]] = []
        try:
            handshake: list[tuple[Any, ...]] = []
            if address.password is not None:
                credentials = (
                    (address.username, address.password) if address.username else (address.password,)
                )
                handshake.append(("AUTH", *credentials))
            if address.db:
                handshake.append(("SELECT", address.db))
            for command in handshake:
                reply = await protocol.send(hiredis.pack_command(command), deadline)
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(f"Redis refused {command[0]}: {reply}")
            # The clock first: it also tells an unauthenticated connection, which Redis would
            # close on a large SCRIPT LOAD instead of answering NOAUTH.
            await self._sample_clock(protocol, deadline)
            loads = [
                protocol.send(pack(("SCRIPT", "LOAD", script.source)), deadline) for script in self._scripts
            ]
            for reply in await asyncio.gather(*loads):
                if isinstance(reply, hiredis.ReplyError):  # e.g. an ACL without SCRIPT: EVAL will do
                    _log.debug("SCRIPT LOAD refused", error=str(reply))
        except BaseException:
            protocol.abort()
            for load in loads:  # failed with the connection: nobody else will look
                if load.done() and not load.cancelled():
                    load.exception()
            raise
        return protocol

    async def _sample_clock(self, protocol: _Protocol, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        reply = await protocol.send(b"*1\r\n$4\r\nTIME\r\n", deadline)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        self.clock.observe(int(reply[0]) * 1_000_000 + int(reply[1]), sent, loop.time())

    async def sync_clock(self, deadline: float | None = None) -> None:
        """Take one more sample of Redis's clock (health checks do, so it stays fresh when idle)."""
        deadline = self.deadline() if deadline is None else deadline
        await self._sample_clock(await self._connection(deadline), deadline)

    async def call(self, *command: Any, deadline: float | None = None) -> Any:
        """Run one command; raise RedisReplyError on an error reply, ConnectionError on a lost connection."""
        deadline = self.deadline() if deadline is None else deadline
        protocol = await self._connection(deadline)
        reply = await protocol.send(hiredis.pack_command(command), deadline)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    async def _after_error(
        self, script: Script, call: ScriptCall, error: Any, *, deadline: float, on_late: LateReply | None
    ) -> Any:
        """An EVALSHA's error reply: NOSCRIPT runs EVAL (which also caches the script) instead.

        Rare: scripts are loaded at every connect (see `register`), so only a SCRIPT FLUSH
        brings it. On the live connection, which may be another one by now.
        """
        if str(error).startswith("NOSCRIPT"):
            keys, args, tail = call
            payload = pack(("EVAL", script.source, len(keys), *keys, *args), tail)
            return await (await self._connection(deadline)).send(payload, deadline, on_late)
        return error

    async def run_script(
        self,
        script: Script,
        keys: list[str],
        args: list[Any],
        tail: Packed = NOTHING,
        *,
        deadline: float | None = None,
        on_late: LateReply | None = None,
    ) -> Any:
        """Run a script by SHA; its arguments are `args` followed by `tail`.

        `on_late` hears the reply if it comes after this call failed (deadline) or was cancelled.
        """
        deadline = self.deadline() if deadline is None else deadline
        protocol = await self._connection(deadline)
        payload = pack(("EVALSHA", script.sha, len(keys), *keys, *args), tail)
        reply = await protocol.send(payload, deadline, on_late)
        if isinstance(reply, hiredis.ReplyError):
            reply = await self._after_error(
                script, (keys, args, tail), reply, deadline=deadline, on_late=on_late
            )
            if isinstance(reply, hiredis.ReplyError):
                raise RedisReplyError(str(reply))
        return reply

    async def run_scripts(
        self,
        script: Script,
        calls: Sequence[ScriptCall],
        *,
        deadline: float | None = None,
        on_late: Sequence[LateReply | None] | None = None,
    ) -> list[Any]:
        """Many script calls in one write; each reply, or its exception, in its place.

        `on_late[i]`, if given, hears call i's reply if it comes too late (see run_script).
        """
        deadline = self.deadline() if deadline is None else deadline
        protocol = await self._connection(deadline)
        hooks = on_late or [None] * len(calls)
        futures = [
            protocol.send(pack(("EVALSHA", script.sha, len(keys), *keys, *args), tail), deadline, hook)
            for (keys, args, tail), hook in zip(calls, hooks, strict=True)
        ]
        replies: list[Any] = []
        for future, call, hook in zip(futures, calls, hooks, strict=True):
            try:
                reply = await future
                if isinstance(reply, hiredis.ReplyError):
                    reply = await self._after_error(script, call, reply, deadline=deadline, on_late=hook)
                replies.append(
                    RedisReplyError(str(reply)) if isinstance(reply, hiredis.ReplyError) else reply
                )
            except (ConnectionError, TimeoutError) as error:
                replies.append(error)
        return replies

    def drop_connection(self, reason: Exception) -> None:
        """Send the next calls to a new connection; the calls in flight on this one still get their replies.

        For a server that has become a replica: reconnecting resolves the address again,
        which after a failover (a DNS name, a Kubernetes Service) leads to the new primary.
        """
        self._retire(reason)

    async def aclose(self) -> None:
        for task in (self._watchdog, self._attempt):
            if task is not None:
                task.cancel()
        closed = ConnectionError("the Redis client was closed")
        for protocol in (self._protocol, *self._retired):
            if protocol is not None:
                protocol.lost = closed
                protocol.abort()
        self._protocol = None
        self._retired.clear()

    async def subscribe(self, channel: str, on_message: Callable[[bytes], None]) -> None:
        """Deliver every message published on `channel`, on a connection of its own, until cancelled.

        A lost connection is re-established (after a pause of one timeout); messages
        published meanwhile are lost, which subscribers must tolerate. No timeouts inside:
        Python 3.11's wait_for can swallow the cancel that ends this loop.
        """
        while True:
            try:
                protocol = await self._connect(self.deadline())
            except (OSError, TimeoutError, RedisReplyError):
                await asyncio.sleep(self._timeout_s)
                continue
            received: asyncio.Queue[Any] = asyncio.Queue()
            protocol.on_push = received.put_nowait  # and None once the connection is lost
            subscribe: tuple[Any, ...] = ("SUBSCRIBE", channel)
            protocol.send_unanswered(hiredis.pack_command(subscribe))
            try:
                while (message := await received.get()) is not None:
                    if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                        on_message(message[2])
            finally:
                protocol.abort()
            await asyncio.sleep(self._timeout_s)
