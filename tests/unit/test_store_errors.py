"""What a Redis error reply means to callers: an outage (UNAVAILABLE) or a bug (UNKNOWN)."""

from __future__ import annotations

import pytest
from quotad_server.errors import StoreUnavailable
from quotad_server.store.redis import RedisStore
from quotad_server.store.resp import RedisReplyError


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", "out of memory"),
        ("READONLY You can't write against a read only replica.", "read-only replica"),
        (
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "lost its primary",
        ),
        ("LOADING Redis is loading the dataset in memory", "loading"),
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", "busy"),
        ("MISCONF Redis is configured to save RDB snapshots, but it's not able to persist", "snapshots"),
        ("NOREPLICAS Not enough good replicas to write.", "too few replicas"),
        ("TRYAGAIN Multiple keys request during rehashing of slot", "resharding"),
        ("CLUSTERDOWN The cluster is down", "cluster is down"),
        ("NOAUTH Authentication required.", "not authenticated"),
        ("WRONGPASS invalid username-password pair", "not authenticated"),
    ],
)
def test_a_redis_that_cannot_serve_is_unavailable(reply: str, says: str) -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1", timeout_s=1)  # never connects
    mapped = store._as_store_error(RedisReplyError(reply))
    assert isinstance(mapped, StoreUnavailable)
    assert says in str(mapped)
    assert reply in str(mapped)  # Redis's own words stay in the message


@pytest.mark.parametrize(
    "reply",
    [
        "ERR user_script:12: attempt to perform arithmetic on a nil value",
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "BUSYKEY Target key name already exists.",  # not BUSY: a word, not a prefix
        "NOSCRIPT No matching script.",
    ],
)
def test_a_bug_stays_itself(reply: str) -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1", timeout_s=1)
    error = RedisReplyError(reply)
    assert store._as_store_error(error) is error
