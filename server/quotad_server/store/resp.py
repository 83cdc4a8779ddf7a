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

Timeouts cost nothing per call: replies come in order, so the oldest pending
request tells whether Redis is answering. A watchdog looks at it a few times
per timeout and, when it is overdue, fails every pending request and drops the
connection (the next call reconnects).
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

    @classmethod
    def of(cls, args: Sequence[Any]) -> Packed:
        if not args:
            return NOTHING
        packed = hiredis.pack_command(tuple(args))
        return cls(len(args), packed[packed.index(b"\r\n") + 2 :])  # without the "*<count>" header


NOTHING = Packed(0, b"")


def pack(command: tuple[Any, ...], tail: Packed = NOTHING) -> bytes:
    """The RESP encoding of `command` followed by the arguments in `tail`."""
    packed: bytes = hiredis.pack_command(command)
    if not tail.count:
        return packed
    header = b"*%d\r\n" % (len(command) + tail.count)
    return b"".join((header, memoryview(packed)[packed.index(b"\r\n") + 2 :], tail.data))


class Script:
    """A Lua script, called by SHA; the client loads it on NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.lost: BaseException | None = None
        self.on_push: Callable[[Any], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if self.on_push is not None:  # a subscribed connection: every reply is a push
                self.on_push(reply)
                continue
            future = self._pending.popleft()[0]
            if not future.done():  # its caller may have been cancelled
                future.set_result(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost is None:
            self.lost = exc or ConnectionError("connection closed by Redis")
        self._fail_pending(ConnectionError(f"lost the Redis connection: {self.lost}"))

    def _fail_pending(self, error: Exception) -> None:
        while self._pending:
            future = self._pending.popleft()[0]
            if not future.done():
                future.set_exception(error)

    def oldest_pending_since(self) -> float | None:
        return self._pending[0][1] if self._pending else None

    def fail(self, error: Exception) -> None:
        """Give up on this connection: fail everything pending with `error` and drop it."""
        self.lost = error
        self._fail_pending(error)
        self.abort()

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.lost is not None or self._transport is None:
            raise ConnectionError(f"the Redis connection is closed: {self.lost}")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((future, self._loop.time()))
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

    Every call either answers or fails within `timeout_s` (plus a quarter of it, the
    watchdog's period), connecting included.
    """

    def __init__(self, address: RedisAddress, *, timeout_s: float, tls: TlsFiles | None = None) -> None:
        self._address = address
        self._timeout_s = timeout_s
        self._tls = tls or TlsFiles()
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
            self._watchdog = asyncio.create_task(self._watch(), name="quotad-redis-watchdog")
        async with asyncio.timeout(self._timeout_s), self._connecting:
            if self._protocol is None or self._protocol.lost is not None:
                self._protocol = await self._connect()
            return self._protocol

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._timeout_s / 4)
            protocol = self._protocol
            since = protocol.oldest_pending_since() if protocol is not None else None
            if protocol is not None and since is not None and loop.time() - since > self._timeout_s:
                protocol.fail(TimeoutError(f"redis did not answer within {self._timeout_s * 1000:.0f} ms"))

    async def _connect(self) -> _Protocol:
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
        handshake: list[tuple[Any, ...]] = []
        if address.password is not None:
            credentials = (address.username, address.password) if address.username else (address.password,)
            handshake.append(("AUTH", *credentials))
        if address.db:
            handshake.append(("SELECT", address.db))
        for command in handshake:
            reply = await protocol.send(hiredis.pack_command(command))
            if isinstance(reply, hiredis.ReplyError):
                protocol.abort()
                raise ConnectionError(f"Redis refused {command[0]}: {reply}")
        return protocol

    async def call(self, *command: Any) -> Any:
        """Run one command; raise RedisReplyError on an error reply, ConnectionError on a lost connection."""
        protocol = await self._connection()
        reply = await protocol.send(hiredis.pack_command(command))
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    @staticmethod
    async def _after_error(protocol: _Protocol, script: Script, call: ScriptCall, error: Any) -> Any:
        """An EVALSHA's error reply: NOSCRIPT runs EVAL (which also caches the script) instead."""
        if str(error).startswith("NOSCRIPT"):
            keys, args, tail = call
            return await protocol.send(pack(("EVAL", script.source, len(keys), *keys, *args), tail))
        return error

    async def run_script(
        self, script: Script, keys: list[str], args: list[Any], tail: Packed = NOTHING
    ) -> Any:
        """Run a script by SHA; its arguments are `args` followed by `tail`."""
        protocol = await self._connection()
        reply = await protocol.send(pack(("EVALSHA", script.sha, len(keys), *keys, *args), tail))
        if isinstance(reply, hiredis.ReplyError):
            reply = await self._after_error(protocol, script, (keys, args, tail), reply)
            if isinstance(reply, hiredis.ReplyError):
                raise RedisReplyError(str(reply))
        return reply

    async def run_scripts(self, script: Script, calls: Sequence[ScriptCall]) -> list[Any]:
        """Many script calls in one write; each reply, or its exception, in its place."""
        protocol = await self._connection()
        futures = [
            protocol.send(pack(("EVALSHA", script.sha, len(keys), *keys, *args), tail))
            for keys, args, tail in calls
        ]
        replies: list[Any] = []
        for future, call in zip(futures, calls, strict=True):
            try:
                reply = await future
                if isinstance(reply, hiredis.ReplyError):
                    reply = await self._after_error(protocol, script, call, reply)
                replies.append(
                    RedisReplyError(str(reply)) if isinstance(reply, hiredis.ReplyError) else reply
                )
            except (ConnectionError, TimeoutError) as error:
                replies.append(error)
        return replies

    def drop_connection(self, reason: Exception) -> None:
        """Close the connection now, failing what is pending with `reason`; the next call reconnects.

        For a server that has become a replica: reconnecting resolves the address again,
        which after a failover (a DNS name, a Kubernetes Service) leads to the new primary.
        """
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(reason)

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.drop_connection(ConnectionError("the Redis client was closed"))

    async def subscribe(self, channel: str, on_message: Callable[[bytes], None]) -> None:
        """Deliver every message published on `channel`, on a connection of its own, until cancelled.

        A lost connection is re-established (after a pause of one timeout); messages
        published meanwhile are lost, which subscribers must tolerate.
        """
        while True:
            try:
                protocol = await asyncio.wait_for(self._connect(), self._timeout_s)
            except (OSError, TimeoutError):
                await asyncio.sleep(self._timeout_s)
                continue
            received: asyncio.Queue[Any] = asyncio.Queue()
            protocol.on_push = received.put_nowait
            subscribe: tuple[Any, ...] = ("SUBSCRIBE", channel)
            protocol.send_unanswered(hiredis.pack_command(subscribe))
            try:
                while protocol.lost is None:
                    try:
                        message = await asyncio.wait_for(received.get(), 1.0)
                    except TimeoutError:
                        continue
                    if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                        on_message(message[2])
            finally:
                protocol.abort()
            await asyncio.sleep(self._timeout_s)
