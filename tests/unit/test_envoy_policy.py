"""The policy's envoy section: refused with its path when it cannot work."""

from __future__ import annotations

import textwrap

import pytest
from quotad_server.policy import PolicyError, parse_policy

BASE = """
    defaults: {tier: free}
    tiers: {free: {limits: [{name: rpm, metric: requests, limit: 10, period: 1m, shadow: true}]}}
"""


def load(envoy: str) -> None:
    parse_policy(textwrap.dedent(BASE) + textwrap.dedent(envoy), "p.yaml")


def test_a_valid_section_and_a_shadow_limit_load() -> None:
    policy = parse_policy(
        textwrap.dedent(BASE)
        + "envoy: {domains: {gw: {subject: user_id, default_tier: free, hits: tokens}}}",
        "p.yaml",
    )
    assert policy.tier_limits["free"][0].shadow
    assert policy.envoy is not None
    domain = policy.envoy.domains["gw"]
    assert (domain.keys, domain.default_tier, domain.hits) == ({"subject": "user_id"}, "free", "tokens")
    assert policy.envoy.store_unavailable == "unavailable"


@pytest.mark.parametrize(
    ("envoy", "says"),
    [
        ("envoy: {domains: {}}", r"envoy\.domains: Dictionary should have at least 1 item"),
        (
            "envoy: {domains: {gw: {default_subject: x}}}",
            r"envoy\.domains\.gw: name the descriptor entry key",
        ),
        ("envoy: {domains: {gw: {subject: k, tenant: k}}}", r"envoy\.domains\.gw: each role needs its own"),
        ("envoy: {domains: {gw: {tenant: k}}}", r"envoy\.domains\.gw: give subject .* or default_subject"),
        ("envoy: {domains: {gw: {subject: k, hits: bytes}}}", r"envoy\.domains\.gw\.hits"),
        (
            "envoy: {domains: {gw: {subject: k, default_tier: gold}}}",
            r"default_tier 'gold' is not one of the tiers",
        ),
        ("envoy: {domains: {gw: {subject: k}}, store_unavailable: maybe}", r"envoy\.store_unavailable"),
    ],
)
def test_a_section_that_cannot_work_is_refused_with_its_path(envoy: str, says: str) -> None:
    with pytest.raises(PolicyError, match=says):
        load(envoy)
