"""One function builds every key; the keys of one decision share a hash tag."""

from __future__ import annotations

import copy
import pickle

from quotad_server.model import Algorithm, Limit, Metric, Scope
from quotad_server.store.redis import RESERVATION_ID, RedisStore, hash_tag, key


def test_key_parts_cannot_collide() -> None:
    assert key("q", "t", "l", "a:b", "c") != key("q", "t", "l", "a", "b:c")
    assert key("q", "t", "l", "a%3Ab") != key("q", "t", "l", "a:b")


def test_keys_carry_the_partition_hash_tag_first() -> None:
    tag = hash_tag("t:acme")
    built = key("quotad", tag, "l", "s", "acme", "{evil}", "b", "rpm")
    assert built.startswith("quotad:{" + tag + "}:")
    # Redis hashes the first {...}: a brace in a subject cannot move the key to another slot.
    assert built.index("{") == len("quotad:")


def test_hash_tags_are_stable_and_fixed_size() -> None:
    assert hash_tag("global") == hash_tag("global")
    assert hash_tag("t:acme") != hash_tag("t:globex")
    assert len(hash_tag("t:" + "x" * 1000)) == 8


def test_reservation_id_shape() -> None:
    assert RESERVATION_ID.match("0123456789abcdef" * 2 + "01234567")
    assert not RESERVATION_ID.match("0123456789ABCDEF" * 2 + "01234567")
    assert Limit("rpm", Scope.SUBJECT, Metric.REQUESTS, Algorithm.TOKEN_BUCKET, 10, 60_000_000).applies_to(
        "any"
    )


def test_the_stores_fast_key_paths_build_what_key_builds() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1", timeout_s=1)  # never connects
    tag = hash_tag("global")
    limits = (
        Limit("rpm", Scope.SUBJECT, Metric.REQUESTS, Algorithm.TOKEN_BUCKET, 10, 60_000_000),
        Limit("a:b", Scope.SUBJECT, Metric.INPUT_TOKENS, Algorithm.SLIDING_WINDOW, 10, 60_000_000),
        Limit("rph", Scope.SUBJECT, Metric.REQUESTS, Algorithm.SLIDING_WINDOW, 10, 3_600_000_000),
        Limit("mini", Scope.SUBJECT, Metric.REQUESTS, Algorithm.SLIDING_WINDOW, 5, 60_000_000, model="m:1"),
        Limit("tenant", Scope.TENANT, Metric.TOTAL_TOKENS, Algorithm.TOKEN_BUCKET, 10, 60_000_000),
        Limit("provider", Scope.GLOBAL, Metric.OUTPUT_TOKENS, Algorithm.TOKEN_BUCKET, 10, 60_000_000),
    )
    for tenant, subject in [("acme", "alice"), ("a:c%me", "b:o%b{x}"), ("acme", "bob")]:
        assert store.limit_keys(tag, limits, tenant, subject) == [
            key("quotad", tag, "l", "s", tenant, subject, "b", "rpm"),
            key("quotad", tag, "l", "s", tenant, subject, "w", "a:b"),
            key("quotad", tag, "l", "s", tenant, subject, "wr"),  # request windows share one zset
            key("quotad", tag, "l", "s", tenant, subject, "wr", "m:1"),
            key("quotad", tag, "l", "t", tenant, "b", "tenant"),
            key("quotad", tag, "l", "g", "b", "provider"),
        ]
    assert store._record_key(tag, "ab" * 20) == key("quotad", tag, "r", "ab" * 20)


def test_a_limit_rebuilds_its_cached_hash_when_unpickled() -> None:
    limit = Limit("rpm", Scope.SUBJECT, Metric.REQUESTS, Algorithm.TOKEN_BUCKET, 10, 60_000_000, model="m")
    pickled = pickle.dumps(limit)
    assert b"_hash" not in pickled  # rebuilt through __init__, not copied
    assert pickle.loads(pickled) == limit
    assert hash(pickle.loads(pickled)) == hash(limit) == hash(copy.deepcopy(limit))
