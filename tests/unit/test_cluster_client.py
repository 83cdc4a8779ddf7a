"""The cluster client's edges, without I/O: seed URLs, QUOTAD_REDIS_CLUSTER, glide's errors as Redis's."""

from __future__ import annotations

import asyncio

import pytest
from glide import ClosingError, RequestError
from glide import ConnectionError as GlideConnectionError
from glide import TimeoutError as GlideTimeoutError
from quotad_server.errors import StoreUnavailable
from quotad_server.settings import Settings, SettingsError
from quotad_server.store.cluster import ClusterAddress, GlideCluster, translate
from quotad_server.store.redis import RedisStore
from quotad_server.store.resp import RedisReplyError

BASE = {"QUOTAD_POLICY": "p.yaml"}


def test_a_url_lists_the_seed_nodes_with_their_credentials() -> None:
    address = ClusterAddress.from_url("rediss://app:s%40cret@h1:6380,h2,[::1]:7000/0")
    assert address.seeds == (("h1", 6380), ("h2", 6379), ("::1", 7000))
    assert (address.tls, address.username, address.password) == (True, "app", "s@cret")
    user_only = ClusterAddress.from_url("rediss://app@h1:6379")  # the password from QUOTAD_REDIS_PASSWORD
    assert (user_only.username, user_only.password) == ("app", None)
    assert ClusterAddress.from_url("redis://h1:6379").username is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("unix:///run/redis.sock", "redis:// or rediss://"),
        ("redis://h1:6379,h2:6379/3", "database 0"),
        ("redis://", "at least one host"),
    ],
)
def test_a_url_no_cluster_has_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterAddress.from_url(url)


def test_the_cluster_client_is_auto_by_default_and_can_be_forced_either_way() -> None:
    assert Settings.from_env({**BASE, "QUOTAD_REDIS_URL": "redis://r:6379"}).redis_cluster == "auto"
    forced = Settings.from_env({**BASE, "QUOTAD_REDIS_URL": "redis://r:6379", "QUOTAD_REDIS_CLUSTER": "TRUE"})
    assert forced.redis_cluster == "true"
    seeds = Settings.from_env({**BASE, "QUOTAD_REDIS_URL": "redis://a:1,b:2"})
    assert seeds.redis_url == "redis://a:1,b:2"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"QUOTAD_REDIS_URL": "redis://a:1", "QUOTAD_REDIS_CLUSTER": "maybe"},
            "expected auto, true or false",
        ),
        ({"QUOTAD_REDIS_URL": "redis://a:1,b:2", "QUOTAD_REDIS_CLUSTER": "false"}, "several seed nodes"),
        ({"QUOTAD_REDIS_URL": "unix:///s.sock", "QUOTAD_REDIS_CLUSTER": "true"}, "redis:// or rediss://"),
        ({"QUOTAD_EMBEDDED_REDIS": "true", "QUOTAD_REDIS_CLUSTER": "true"}, "needs QUOTAD_REDIS_URL"),
    ],
)
def test_a_cluster_setting_that_cannot_work_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**BASE, **env})


@pytest.mark.parametrize(
    ("glide_message", "redis_reply"),
    [
        (
            "An error was signalled by the server: - TryAgain: Multiple keys request during rehashing of slot",
            "TRYAGAIN",
        ),
        ("An error was signalled by the server: - ClusterDown: The cluster is down", "CLUSTERDOWN"),
        ("An error was signalled by the server: - MasterDown: Link with MASTER is down", "MASTERDOWN"),
        (
            "An error was signalled by the server: - ReadOnly: You can't write against a read only replica.",
            "READONLY",
        ),
        ("An error was signalled by the server: - BusyLoadingError: Redis is loading", "LOADING"),
        ("OOM: command not allowed when used memory > 'maxmemory'.", "OOM"),
        ("NOREPLICAS: Not enough good replicas to write.", "NOREPLICAS"),
    ],
)
def test_a_cluster_that_cannot_serve_now_is_unavailable_with_its_own_words(
    glide_message: str, redis_reply: str
) -> None:
    error = translate(RequestError(glide_message))
    assert isinstance(error, RedisReplyError)
    assert str(error).split(" ", 1)[0] == redis_reply
    store = RedisStore.cluster("redis://127.0.0.1:1", timeout_s=0.25)  # never connects
    mapped = store._as_store_error(error)
    assert isinstance(mapped, StoreUnavailable)
    assert glide_message.rsplit(": ", 1)[-1] in str(mapped)  # Redis's message, as it said it


def test_a_script_bug_stays_a_bug_and_a_lost_connection_is_an_outage() -> None:
    bug = translate(
        RequestError(
            "An error was signalled by the server: - ResponseError: Unknown command called from script"
        )
    )
    assert isinstance(bug, RedisReplyError)
    assert str(bug).startswith("ERR ")
    store = RedisStore.cluster("redis://127.0.0.1:1", timeout_s=0.25)
    assert store._as_store_error(bug) is bug  # UNKNOWN, and logged: never hidden as an outage
    for error in (
        GlideConnectionError("refused"),
        ClosingError("closed"),
        RequestError("Reached maximum inflight requests"),
    ):
        assert isinstance(translate(error), ConnectionError)
    assert isinstance(translate(GlideTimeoutError("timed out")), TimeoutError)


async def test_a_reply_after_its_deadline_is_heard_by_on_late_as_on_one_server() -> None:
    """The late-reply path of the cluster client (RedisStore undoes what such a reply reserved)."""
    cluster = GlideCluster(ClusterAddress((("127.0.0.1", 1),)), timeout_s=0.01)  # never connects
    loop = asyncio.get_running_loop()
    heard: list[object] = []
    reply: asyncio.Future[object] = loop.create_future()
    with pytest.raises(TimeoutError):
        await cluster._within(reply, loop.time() + 0.01, heard.append)
    assert cluster.in_doubt == 1  # RedisStore.quiesce waits for it
    reply.set_result([1, 1796271474327952])
    await asyncio.sleep(0)
    assert heard == [[1, 1796271474327952]]
    assert cluster.in_doubt == 0

    # A caller that goes away (cancelled) leaves its reply to on_late too; a late error is translated.
    failing: asyncio.Future[object] = loop.create_future()
    waiting = asyncio.ensure_future(cluster._within(failing, loop.time() + 10, heard.append))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    failing.set_exception(
        RequestError("An error was signalled by the server: - ClusterDown: The cluster is down")
    )
    await asyncio.sleep(0)
    assert isinstance(heard[-1], RedisReplyError)
    assert str(heard[-1]).startswith("CLUSTERDOWN")
