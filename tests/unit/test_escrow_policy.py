"""Escrow in the policy: tenants spread over partitions, global limits become slices, and the
key -> slot mapping the slot tests rely on is Redis Cluster's."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest
from quotad_server.policy import PolicyError, parse_policy
from quotad_server.store.redis import hash_tag

from tests.keyslot import key_slot

POLICY = """
    defaults: {tier: t}
    tiers: {t: {limits: [{name: rpm, metric: requests, limit: 10, period: 1m}]}}
    tenants: {"*": {limits: [{name: tpm, metric: total_tokens, limit: 1000, period: 1m}]}}
    global:
      limits:
        - {name: g, metric: total_tokens, limit: 100000, period: 1m}
"""


def test_without_escrow_every_decision_of_a_policy_with_global_limits_is_in_one_partition() -> None:
    policy = parse_policy(textwrap.dedent(POLICY), "p.yaml")
    assert {policy.partition(f"tenant-{i}") for i in range(100)} == {"global"}
    assert policy.global_limits[0].slices == 0


def test_with_escrow_tenants_spread_over_the_partitions_and_global_limits_are_sliced() -> None:
    policy = parse_policy(textwrap.dedent(POLICY) + "escrow: {partitions: 8}\n", "p.yaml")
    assert policy.escrow is not None
    partitions = {policy.partition(f"tenant-{i}") for i in range(200)}
    assert partitions == set(policy.escrow.partition_names()) == {f"p:{i}" for i in range(8)}
    assert policy.partition("acme") == policy.partition("acme")  # stable: crc32, not hash()
    assert policy.global_limits[0].slices == 8
    assert all(limit.slices == 0 for limit in policy.tier_limits["t"] + policy.tenant_limits["*"])
    assert policy.escrow.floor_units(100000) == 125  # 1% of the even share
    assert policy.escrow.floor_units(10) == 1  # never 0: a slice keeps a unit to drain its debt with


def test_escrow_refuses_global_limits_it_cannot_split() -> None:
    text = textwrap.dedent(POLICY).replace(
        "global:\n  limits:\n", "global:\n  limits:\n    - {name: c, metric: concurrent, limit: 9}\n"
    )
    with pytest.raises(PolicyError, match=r"global\.limits\[0\] \('c'\): escrow splits token buckets"):
        parse_policy(text + "escrow: {partitions: 4}\n", "p.yaml")
    with pytest.raises(PolicyError, match=r"escrow\.partitions"):
        parse_policy(textwrap.dedent(POLICY) + "escrow: {partitions: 1}\n", "p.yaml")


BIG_TENANT = """
    tenants:
      big co:
        limits:
          - {name: big-tpm, metric: total_tokens, limit: 50000, period: 1m}
          - {name: big-rpm, metric: requests, limit: 600, period: 1m, algorithm: sliding_window}
      small:
        limits: [{name: small-tpm, metric: total_tokens, limit: 500, period: 1m}]
"""


def test_a_large_tenants_subjects_spread_over_the_partitions_and_its_limits_are_sliced() -> None:
    text = textwrap.dedent(POLICY).replace('tenants: {"*"', 'unused: {"*"').replace("unused:", "#")
    text += textwrap.dedent(BIG_TENANT) + 'escrow: {partitions: 8, tenants: ["big co"]}\n'
    policy = parse_policy(text, "p.yaml")
    assert policy.spreads("big co")
    assert not policy.spreads("small")
    spread = {policy.partition("big co", f"user-{i}") for i in range(200)}
    assert spread == {f"p:{i}" for i in range(8)}  # one tenant, every partition
    assert policy.partition("big co", "user-1") == policy.partition("big co", "user-1")
    # Every other tenant stays whole, in one partition whatever the subject.
    assert {policy.partition("small", f"user-{i}") for i in range(50)} == {policy.partition("small")}
    assert all(limit.slices == 8 for limit in policy.tenant_limits["big co"])
    assert all(limit.slices == 0 for limit in policy.tenant_limits["small"] + policy.tier_limits["t"])
    assert policy.global_limits[0].slices == 8


def test_a_large_tenant_spreads_without_global_limits_too() -> None:
    text = textwrap.dedent(POLICY).split("global:")[0].replace('tenants: {"*"', "# ")
    policy = parse_policy(text + textwrap.dedent(BIG_TENANT) + "escrow: {tenants: [small]}\n", "p.yaml")
    assert len({policy.partition("small", f"u{i}") for i in range(200)}) == 16  # the default count
    assert policy.partition("big co", "u1") == "t:big co"  # a tenant of its own, as without escrow


def test_escrow_refuses_tenants_it_cannot_split() -> None:
    base = textwrap.dedent(POLICY).replace('tenants: {"*"', "# ") + textwrap.dedent(BIG_TENANT)
    with pytest.raises(PolicyError, match=r"escrow\.tenants: 'nobody' is not a tenant named under tenants"):
        parse_policy(base + "escrow: {tenants: [nobody]}\n", "p.yaml")
    with pytest.raises(PolicyError, match=r"escrow\.tenants: '\*' is not a tenant named"):
        parse_policy(textwrap.dedent(POLICY) + 'escrow: {tenants: ["*"]}\n', "p.yaml")
    budget = base.replace(
        "- {name: big-tpm, metric: total_tokens, limit: 50000, period: 1m}",
        "- {name: big-usd, metric: total_tokens, limit: 100, period: month}",
    )
    with pytest.raises(PolicyError, match=r"tenants\.big co\.limits\[0\] \('big-usd'\): escrow splits"):
        parse_policy(budget + 'escrow: {tenants: ["big co"]}\n', "p.yaml")


def test_key_slot_is_redis_clusters() -> None:
    # The test vector of the Redis Cluster specification, and its hash tag rules.
    assert key_slot("123456789") == 12739
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == key_slot("foo{}{bar}")  # an empty tag: the whole key is hashed
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")


def test_escrow_partitions_spread_evenly_over_any_contiguous_split_of_the_slots() -> None:
    """Escrow partitions' tags are placed in the slot space (golden-ratio sequence), not hashed:
    hashed, 64 partitions fell 27 / 17 / 20 on 3 shards; placed, within 6% of even."""
    tags = [hash_tag(f"p:{index}") for index in range(1024)]  # escrow allows up to 1,024
    assert len(set(tags)) == len(tags)  # distinct: two partitions never share keys
    assert all(len(tag) == 8 and int(tag, 16) >= 0 for tag in tags)  # as reservation ids carry them
    golden = (5**0.5 - 1) / 2
    assert [key_slot("{" + tag + "}") for tag in tags] == [int(i * golden % 1 * 16384) for i in range(1024)]
    for partitions in (32, 64, 128):
        for shards in (2, 3, 4, 6):
            counts = Counter(key_slot("{" + tag + "}") * shards // 16384 for tag in tags[:partitions])
            assert len(counts) == shards
            assert max(counts.values()) <= 1.125 * partitions / shards, (partitions, shards, counts)
    assert hash_tag("t:acme") == hash_tag("t:acme") != hash_tag("t:acme2")  # other partitions: hashed
