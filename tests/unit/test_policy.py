"""Policy validation: good files load, bad ones are refused naming file, path and value."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from quotad_server.model import Algorithm, Metric, Scope
from quotad_server.policy import PolicyError, load_policy, parse_duration_us, parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "server" / "quotad_server" / "examples" / "policy.yaml"

BASE = """
    defaults: {tier: free}
    tiers:
      free:
        limits:
          - {name: rpm, metric: requests, limit: 10, period: 1m}
"""


def parse(text: str) -> object:
    return parse_policy(textwrap.dedent(text), "p.yaml")


def test_the_shipped_example_loads_with_the_documented_limits() -> None:
    policy = load_policy(EXAMPLE)
    free = {limit.name: limit for limit in policy.tier_limits["free"]}
    assert (free["requests-per-minute"].limit, free["requests-per-minute"].period_us) == (10, 60_000_000)
    assert free["requests-per-minute"].algorithm is Algorithm.SLIDING_WINDOW
    assert (free["requests-per-hour"].limit, free["requests-per-hour"].period_us) == (100, 3_600_000_000)
    assert (free["tokens-per-minute"].limit, free["tokens-per-minute"].metric) == (1000, Metric.TOTAL_TOKENS)
    assert free["tokens-per-minute"].algorithm is Algorithm.TOKEN_BUCKET
    assert (free["in-flight"].limit, free["in-flight"].algorithm) == (2, Algorithm.CONCURRENCY)
    premium = {limit.name: limit for limit in policy.tier_limits["premium"]}
    assert premium["tokens-per-minute"].limit == 10_000


def test_limits_for_orders_scopes_and_filters_models() -> None:
    policy = load_policy(EXAMPLE)
    limits = policy.limits_for("free", "acme", "gpt-4o-mini")
    assert [limit.scope for limit in limits] == [Scope.SUBJECT] * 4 + [Scope.TENANT, Scope.GLOBAL]
    assert limits[-1].name == "gpt-4o-mini-tpm"
    assert "gpt-4o-tpm" in {limit.name for limit in policy.limits_for("free", "acme", "gpt-4o")}


def test_named_tenants_override_the_wildcard() -> None:
    policy = parse_policy(
        textwrap.dedent(
            BASE
            + """
    tenants:
      "*": {limits: [{name: cap, metric: total_tokens, limit: 100, period: 1d}]}
      acme: {limits: [{name: cap, metric: total_tokens, limit: 5000, period: 1d}]}
    """
        ),
        "p.yaml",
    )
    assert policy.limits_for("free", "acme", "")[-1].limit == 5000
    assert policy.limits_for("free", "other", "")[-1].limit == 100
    assert policy.partition("acme") != policy.partition("other")  # no global limits: one partition per tenant


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1s", 1_000_000),
        ("500ms", 500_000),
        ("1m", 60_000_000),
        ("1h", 3_600_000_000),
        ("1d", 86_400_000_000),
    ],
)
def test_durations(text: str, expected: int) -> None:
    assert parse_duration_us(text) == expected


@pytest.mark.parametrize(
    ("change", "location", "value"),
    [
        ("period: 1m}", "tiers.free.limits[0].period: invalid duration", "'1 minute'"),
        ("metric: requests", "tiers.free.limits[0].metric: unknown metric", "'tokens'"),
        ("limit: 10,", "tiers.free.limits[0].limit", "-3"),
        ("name: rpm", "tiers.free.limits[0].name: invalid limit name", "'r p m'"),
    ],
)
def test_bad_values_name_file_path_and_value(change: str, location: str, value: str) -> None:
    bad = {
        "period: 1m}": "period: 1 minute}",
        "metric: requests": "metric: tokens",
        "limit: 10,": "limit: -3,",
        "name: rpm": "name: r p m",
    }[change]
    with pytest.raises(PolicyError) as info:
        parse(BASE.replace(change, bad))
    message = str(info.value)
    assert message.startswith("p.yaml: ")
    assert location in message
    assert f"(got {value})" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (BASE.replace("tier: free", "tier: gold"), "defaults.tier 'gold' is not one of the tiers"),
        (BASE.replace("period: 1m", "period: 1m, algorithm: leaky"), "algorithm"),
        (
            BASE.replace(
                "metric: requests, limit: 10, period: 1m", "metric: concurrent, limit: 2, period: 1m"
            ),
            "a concurrent limit takes neither period nor algorithm",
        ),
        (BASE.replace(", period: 1m", ""), "a requests limit needs a period"),
        (
            BASE + "          - {name: rpm, metric: requests, limit: 5, period: 1h}\n",
            "duplicate limit name 'rpm'",
        ),
        (BASE + "    unknown_section: 1\n", "unknown_section"),
        (BASE + "    leases: {min: 10s, default: 5s, max: 1m}\n", "need 0 < min <= default <= max"),
        (
            BASE + "    models: {gpt-4o: {}}\n"
            "    global: {limits: [{name: g, metric: requests, limit: 1, period: 1s, model: gpt-5}]}\n",
            "names model 'gpt-5', not in models",
        ),
        ("- just\n- a list\n", "expected a mapping"),
        ("tiers: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_policies_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(PolicyError, match=r"^p\.yaml: ") as info:
        parse(text)
    assert fragment in str(info.value)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read"):
        load_policy(tmp_path / "missing.yaml")
