"""Redis Cluster through valkey-glide: the connection RedisStore uses when its Redis has several shards.

RedisStore holds everything quotad knows about its keys, scripts, deadlines and late replies;
it talks to Redis through a small connection interface (`Connection` in store/redis.py).
`RespClient` (store/resp.py) is quotad's own, for one server; `GlideCluster`, here, is the same
interface over valkey-glide's `GlideClusterClient`, which follows the cluster: it maps slots to
nodes, follows MOVED and ASK, retries TRYAGAIN while a slot migrates, and learns the new
primaries after a failover. No cluster protocol is written here.

Why glide, measured (`python bench/cluster_clients.py`: quotad's real reserve script, 64 in flight,
a 3-shard cluster on loopback, this project's 2-vCPU machine; bench/results/cluster_clients.txt):

    client CPU per call                      quiet     while 1,000 slots move (--reshard 1000)
    quotad's RespClient, one node            16 µs     20 µs
    valkey-glide GlideClusterClient         102 µs    126 µs, 0 errors
    GlideCluster below (glide + deadlines)  143 µs    179 µs, 0 errors
    redis-py RedisCluster (asyncio)         163 µs    1,840 µs, 303 errors of 10,000 (connections
                                                      lost mid-flight); its cluster pipeline
                                                      refuses EVALSHA

(issue 15 measured coredis at 275 µs; it is not installed here.) glide multiplexes every call to a
node on one connection, pipelining them as quotad's own client does; the 40 µs GlideCluster adds is
one asyncio task and one timer per call, the price of deadlines that never cancel a sent script.
So quotad's own client stays the one for a single server.

What stays as RedisStore has it for one server:

- Deadlines. Every call answers or fails by its own deadline (`timeout_s` by default), whatever
  glide is doing. A call past it is not cancelled inside glide: its reply, when it comes, goes to
  the call's `on_late`, and RedisStore undoes a reservation that nobody holds. glide's own request
  timeout is the drain time of the single-node client (DRAIN_S): how long a late reply is awaited.
- Scripts run by SHA (glide's Script: EVALSHA, and SCRIPT LOAD on NOSCRIPT), each with its deadline
  on Redis's clock in ARGV, so a script that glide delivers late (after a redirection, a reconnect
  or a failover) writes nothing.
- Errors: a reply of a Redis that cannot serve now (CLUSTERDOWN, TRYAGAIN past the deadline,
  MASTERDOWN, READONLY, LOADING, OOM...) is a RedisReplyError with Redis's own code and message,
  which RedisStore maps to UNAVAILABLE; a connection glide cannot make or keep is a ConnectionError
  (UNAVAILABLE too). Any other error reply is a bug, and surfaces as one.
- The clock: TIME from any node, and every script's reply, feed one estimate (RedisClock). The
  nodes' clocks must agree (NTP) to within the scripts' margin (a fifth of the timeout).
- Wake-ups: the scripts PUBLISH on '<prefix>:wake'. A Redis Cluster forwards a PUBLISH to every
  node, so one subscription, on any node, hears the whole cluster; glide keeps it subscribed
  through failovers and topology changes.

What glide sends again (read in its redis-rs fork, glide-core/redis-rs/redis/src/types.rs,
`RedisError::retry_method`, at valkey-glide 7d61630b0): MOVED, ASK, TRYAGAIN, CLUSTERDOWN,
MASTERDOWN and READONLY (Redis ran nothing), and a request whose write failed (FatalSendError:
nothing was delivered). A connection lost after the script was written (FatalReceiveError,
reset, EOF) fails the call without sending it again: ConnectionError, UNAVAILABLE, and a late
reply never comes. The one path that could run a script twice is an I/O error of an unusual kind
(not reset, refused, aborted, EOF, broken pipe or timed out), which glide retries at once; the
script's deadline bounds when it may still write, and a reservation made twice is charged twice
(never admitted beyond a limit).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import structlog
from glide import (
    AdvancedGlideClusterClientConfiguration,
    AllPrimaries,
    ClosingError,
    GlideClusterClient,
    GlideClusterClientConfiguration,
    GlideError,
    Logger,
    LogLevel,
    NodeAddress,
    RandomNode,
    ServerCredentials,
    TlsAdvancedConfiguration,
)
from glide import ConnectionError as GlideConnectionError
from glide import Script as GlideScript
from glide import TimeoutError as GlideTimeoutError

from quotad_server.store.resp import (
    DRAIN_S,
    NOTHING,
    LateReply,
    Packed,
    RedisClock,
    RedisReplyError,
    Script,
    ScriptCall,
    TlsFiles,
)

_log = structlog.get_logger("quotad.redis")


@dataclass(frozen=True, slots=True)
class ClusterAddress:
    """Where a cluster is: its seed nodes (any of its nodes; glide discovers the rest) and credentials.

    From a URL listing one or more seeds: `redis://host1:6379,host2:6379,host3:6379`, `rediss://`
    for TLS, `redis://user:password@host:port,...` with credentials.
    """

    seeds: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> ClusterAddress:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"a Redis Cluster needs a redis:// or rediss:// URL, not {parsed.scheme!r}")
        if parsed.path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0")
        credentials, _, hosts = parsed.netloc.rpartition("@")
        username, _, password = credentials.partition(":")  # as urlparse reads them
        seeds = [_seed(host) for host in hosts.split(",")]
        if not seeds or not all(name for name, _ in seeds):
            raise ValueError("a Redis Cluster URL needs at least one host")
        return cls(
            tuple(seeds),
            tls=parsed.scheme == "rediss",
            username=unquote(username) or None,
            password=unquote(password) or None,
        )


def _seed(text: str) -> tuple[str, int]:
    """`host:port`, `host` (port 6379) or `[ipv6]:port`."""
    text = text.strip()
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        name, _, port = text.partition(":")
    return name, int(port or 6379)


# glide reports an error reply as "An error was signalled by the server: - <Kind>: <message>",
# with redis-rs's name of Redis's error code; codes redis-rs does not name come as "<CODE>: <message>".
_SIGNALLED = re.compile(r"An error was signalled by the server: - (\w+): ?(.*)", re.DOTALL)
_OWN_CODE = re.compile(r"([A-Z][A-Z_]+): ?(.*)", re.DOTALL)
_CODES = {
    "ResponseError": "ERR",
    "TryAgain": "TRYAGAIN",
    "ClusterDown": "CLUSTERDOWN",
    "MasterDown": "MASTERDOWN",
    "ReadOnly": "READONLY",
    "BusyLoadingError": "LOADING",
    "Moved": "MOVED",
    "Ask": "ASK",
    "NoScriptError": "NOSCRIPT",
    "CrossSlot": "CROSSSLOT",
    "ExecAbortError": "EXECABORT",
    "AuthenticationFailed": "NOAUTH",
    "NotBusy": "NOTBUSY",
}


_MOVING = re.compile(r"An error was signalled by the server: - (Moved|Ask|TryAgain):")
RESEND_PAUSE_S = 0.005
"""The pause before sending again a script whose slot is moving (see GlideCluster._invoke)."""


def translate(error: GlideError) -> Exception:
    """A glide error as quotad's clients raise theirs: RedisReplyError with Redis's code first for an
    error reply, TimeoutError, or ConnectionError for anything glide could not deliver."""
    if isinstance(error, GlideTimeoutError):
        return TimeoutError(f"redis did not answer: {error}")
    if isinstance(error, GlideConnectionError | ClosingError):
        return ConnectionError(f"redis cluster: {error}")
    message = str(error)
    if signalled := _SIGNALLED.match(message):
        kind, text = signalled.groups()
        return RedisReplyError(f"{_CODES.get(kind, kind.upper())} {text}".strip())
    if own := _OWN_CODE.match(message):
        return RedisReplyError(f"{own[1]} {own[2]}".strip())
    # Not a reply: glide could not deliver the call (no connection to the slot's node, too many
    # calls in flight, a slot no node serves while the cluster changes).
    return ConnectionError(f"redis cluster: {message}")


def _encode(value: Any) -> str | bytes:
    return value if isinstance(value, str | bytes) else str(value)


class GlideCluster:
    """The connection interface of RedisStore (see RespClient) over one GlideClusterClient.

    Connected lazily, by the first call that needs it, within that call's deadline; a failed
    attempt is retried by the next call.
    """

    def __init__(
        self,
        address: ClusterAddress,
        *,
        timeout_s: float,
        tls: TlsFiles | None = None,
        client_name: str = "quotad",
    ) -> None:
        self._address = address
        self._timeout_s = timeout_s
        self._tls = tls or TlsFiles()
        self._client_name = client_name
        self._client: GlideClusterClient | None = None
        self._attempt: asyncio.Task[GlideClusterClient] | None = None
        self._scripts: dict[bytes, GlideScript] = {}
        self._sources: tuple[Script, ...] = ()
        self._late: set[asyncio.Future[Any]] = set()
        self.clock = RedisClock()
        # glide's core logs to the console in a format of its own; quotad reports what fails
        # (UNAVAILABLE with Redis's message, its log line per RPC), so it stays quiet unless set up.
        Logger.init(LogLevel.OFF)

    def _config(
        self, subscriptions: GlideClusterClientConfiguration.PubSubSubscriptions | None = None
    ) -> GlideClusterClientConfiguration:
        address = self._address
        tls_config = None
        if address.tls and (self._tls.ca_file or self._tls.cert_file):
            tls_config = TlsAdvancedConfiguration(
                root_pem_cacerts=Path(self._tls.ca_file).read_bytes() if self._tls.ca_file else None,
                client_cert_path=self._tls.cert_file,
                client_key_path=self._tls.key_file,
            )
        return GlideClusterClientConfiguration(
            [NodeAddress(host, port) for host, port in address.seeds],
            use_tls=address.tls,
            credentials=ServerCredentials(address.password, address.username)
            if address.password is not None
            else None,
            # How long glide keeps a call: quotad's own deadline fails the caller first, and the
            # reply, if it comes within this, is heard (late replies, see the module docstring).
            request_timeout=int(DRAIN_S * 1000),
            client_name=self._client_name,
            pubsub_subscriptions=subscriptions,
            advanced_config=AdvancedGlideClusterClientConfiguration(
                connection_timeout=max(250, int(self._timeout_s * 1000)), tls_config=tls_config
            ),
        )

    # -- the connection interface of RedisStore ----------------------------------------------

    @property
    def in_doubt(self) -> int:
        """Calls with an `on_late` hook whose caller gave up and whose reply may still come."""
        return len(self._late)

    def register(self, *scripts: Script) -> None:
        """The scripts to call by SHA; glide loads one on NOSCRIPT, and each is loaded at connect."""
        for script in scripts:
            self._scripts[script.sha] = GlideScript(script.source)  # type: ignore[no-untyped-call]
        self._sources += scripts

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._timeout_s

    async def _connection(self, deadline: float) -> GlideClusterClient:
        if self._client is not None:
            return self._client
        attempt = self._attempt
        if attempt is None or attempt.done():
            attempt = self._attempt = asyncio.create_task(self._connect(), name="quotad-cluster-connect")
            attempt.add_done_callback(_consume)  # a failure no caller waited for is not an error to log
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(attempt)
        except GlideError as error:
            raise translate(error) from error

    async def _connect(self) -> GlideClusterClient:
        client = await GlideClusterClient.create(self._config())
        try:
            for script in self._sources:  # on every primary, so that first calls find them
                await client.custom_command(["SCRIPT", "LOAD", script.source], AllPrimaries())
        except GlideError as error:  # e.g. an ACL without SCRIPT: glide loads on NOSCRIPT
            _log.debug("SCRIPT LOAD refused", error=str(error))
        self._client = client
        return client

    async def _within(
        self, call: Awaitable[Any], deadline: float, on_late: LateReply | None, *, raw: bool = False
    ) -> Any:
        """`call`'s reply, by `deadline`; past it TimeoutError, and `on_late` hears the reply.

        The call is a task of its own that is never cancelled here: glide may have sent it, and
        its reply tells what the script did. With `raw`, an error comes back as its exception
        instead of being raised.
        """
        loop = asyncio.get_running_loop()
        task: asyncio.Future[Any] = asyncio.ensure_future(call)
        if not task.done():
            # Wake at the reply or at the deadline, whichever comes first: one timer and one
            # callback (asyncio.wait costs twice as much CPU per call).
            waiter = loop.create_future()
            wake = functools.partial(_wake, waiter)
            timer = loop.call_at(deadline, wake)
            task.add_done_callback(wake)
            try:
                await waiter
            except asyncio.CancelledError:
                self._hear_late(task, on_late)
                raise
            finally:
                timer.cancel()
                task.remove_done_callback(wake)
            if not task.done():
                self._hear_late(task, on_late)
                raise TimeoutError(f"redis did not answer within {self._timeout_s * 1000:.0f} ms")
        error = task.exception()
        if error is None:
            return task.result()
        mapped = translate(error) if isinstance(error, GlideError) else error
        if raw:
            return mapped
        raise mapped from error

    def _hear_late(self, task: asyncio.Future[Any], on_late: LateReply | None) -> None:
        if on_late is None:
            task.add_done_callback(_consume)
            return
        self._late.add(task)

        def heard(done: asyncio.Future[Any]) -> None:
            self._late.discard(done)
            if done.cancelled():
                return
            error = done.exception()
            on_late(translate(error) if isinstance(error, GlideError) else error or done.result())

        task.add_done_callback(heard)

    async def sync_clock(self, deadline: float | None = None) -> None:
        """One more sample of Redis's clock, from any node."""
        deadline = self.deadline() if deadline is None else deadline
        client = await self._connection(deadline)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        reply = await self._within(client.custom_command(["TIME"], RandomNode()), deadline, None)
        self.clock.observe(int(reply[0]) * 1_000_000 + int(reply[1]), sent, loop.time())

    async def call(self, *command: Any, deadline: float | None = None) -> Any:
        """One command: routed by its key, or to any node for a command without one (INFO, CLUSTER, TIME)."""
        deadline = self.deadline() if deadline is None else deadline
        client = await self._connection(deadline)
        name = str(command[0]).upper()
        route = RandomNode() if name in ("INFO", "CLUSTER", "TIME", "PING") else None
        reply = await self._within(
            client.custom_command([_encode(c) for c in command], route), deadline, None
        )
        if isinstance(reply, dict):  # glide makes a map of HGETALL's reply; RespClient's is a flat list
            return [item for pair in reply.items() for item in pair]
        return reply

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
        deadline = self.deadline() if deadline is None else deadline
        client = await self._connection(deadline)
        return await self._within(
            self._invoke(client, script, (keys, args, tail), deadline), deadline, on_late
        )

    async def _invoke(
        self, client: GlideClusterClient, script: Script, call: ScriptCall, deadline: float
    ) -> Any:
        """The script, sent again while the cluster says its slot is moving, until `deadline`.

        glide follows MOVED and ASK and retries TRYAGAIN itself, a few times; these come back
        when a slot moves again meanwhile, or while a slot's keys are still being migrated (a
        script whose keys are partly moved, or not created yet, gets TRYAGAIN until the slot's
        migration ends). Redis ran nothing when it answered them, so sending again is safe.
        """
        keys, args, tail = call
        glide_script = self._scripts[script.sha]
        arguments = [*map(_encode, args), *tail.values]
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await client.invoke_script(glide_script, keys=list(keys), args=arguments)
            except GlideError as error:
                if not _MOVING.match(str(error)) or loop.time() + RESEND_PAUSE_S >= deadline:
                    raise
            await asyncio.sleep(RESEND_PAUSE_S)

    async def run_scripts(
        self,
        script: Script,
        calls: Sequence[ScriptCall],
        *,
        deadline: float | None = None,
        on_late: Sequence[LateReply | None] | None = None,
    ) -> list[Any]:
        """Many script calls at once (glide pipelines them per node); each reply, or its exception, in its place."""
        deadline = self.deadline() if deadline is None else deadline
        client = await self._connection(deadline)
        hooks = on_late or [None] * len(calls)
        replies = await asyncio.gather(
            *(
                self._within(self._invoke(client, script, call, deadline), deadline, hook, raw=True)
                for call, hook in zip(calls, hooks, strict=True)
            ),
            return_exceptions=True,
        )
        return [reply for reply in replies]

    def drop_connection(self, reason: Exception) -> None:
        """Nothing to do: glide follows the cluster's topology (a demoted primary answers MOVED)."""

    async def subscribe(self, channel: str, on_message: Callable[[bytes], None]) -> None:
        """Deliver every message published on `channel` anywhere in the cluster, until cancelled.

        A client of its own, subscribed at connect; glide resubscribes after failovers. Retried
        (after a pause of one timeout) while the cluster cannot be reached.
        """

        def received(message: Any, _context: Any) -> None:
            data = message.message
            on_message(data if isinstance(data, bytes) else str(data).encode())

        modes = GlideClusterClientConfiguration.PubSubChannelModes
        subscriptions = GlideClusterClientConfiguration.PubSubSubscriptions(
            channels_and_patterns={modes.Exact: {channel}}, callback=received, context=None
        )
        while True:
            try:
                client = await GlideClusterClient.create(self._config(subscriptions))
                break
            except GlideError as error:
                _log.debug("cannot subscribe to the cluster yet", error=str(error))
                await asyncio.sleep(self._timeout_s)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            await asyncio.shield(client.close())

    async def aclose(self) -> None:
        if self._attempt is not None and not self._attempt.done():
            self._attempt.cancel()
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _wake(waiter: asyncio.Future[None], *_: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _consume(task: asyncio.Future[Any]) -> None:
    """Look at the outcome of a call nobody waits for, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
