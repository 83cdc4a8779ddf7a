"""One function builds every key; the keys of one decision share a hash tag."""

from __future__ import annotations

from quotad_server.model import Algorithm, Limit, Metric, Scope
from quotad_server.store.redis import RESERVATION_ID, hash_tag, key


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
