"""The operations settings: metrics endpoint, policy polling, shutdown drain, Redis password and TLS."""

from __future__ import annotations

import pytest
from quotad_server.cli import redis_connection_options
from quotad_server.metrics import Metrics
from quotad_server.model import Decision, ReserveOutcome
from quotad_server.policy import parse_policy
from quotad_server.settings import Settings, SettingsError

BASE = {"QUOTAD_POLICY": "p.yaml", "QUOTAD_REDIS_URL": "redis://redis:6379/0"}


def test_defaults_keep_metrics_off_and_poll_every_second() -> None:
    settings = Settings.from_env(BASE)
    assert settings.metrics_listen == ""
    assert settings.metrics_fd == -1  # bind QUOTAD_METRICS_LISTEN itself
    assert settings.policy_poll_ms == 1000
    assert settings.shutdown_drain_ms == 0
    assert redis_connection_options(settings) == {}


def test_everything_can_be_set() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "QUOTAD_REDIS_URL": "rediss://redis.internal:6380/0",
            "QUOTAD_METRICS_LISTEN": "0.0.0.0:9090",
            "QUOTAD_POLICY_POLL_MS": "250",
            "QUOTAD_SHUTDOWN_DRAIN_MS": "3000",
            "QUOTAD_REDIS_PASSWORD": "s3cret",
            "QUOTAD_REDIS_TLS_CA_FILE": "/etc/quotad/redis-tls/ca.crt",
            "QUOTAD_REDIS_TLS_CERT_FILE": "/etc/quotad/redis-tls/tls.crt",
            "QUOTAD_REDIS_TLS_KEY_FILE": "/etc/quotad/redis-tls/tls.key",
        }
    )
    assert (settings.metrics_listen, settings.policy_poll_ms, settings.shutdown_drain_ms) == (
        "0.0.0.0:9090",
        250,
        3000,
    )
    assert redis_connection_options(settings) == {
        "password": "s3cret",
        "ssl_ca_certs": "/etc/quotad/redis-tls/ca.crt",
        "ssl_certfile": "/etc/quotad/redis-tls/tls.crt",
        "ssl_keyfile": "/etc/quotad/redis-tls/tls.key",
    }
    assert "s3cret" not in repr(settings)  # a settings object in a log line leaks no password


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"QUOTAD_METRICS_LISTEN": "9090"}, "QUOTAD_METRICS_LISTEN"),
        ({"QUOTAD_METRICS_LISTEN": "0.0.0.0:50051"}, "QUOTAD_METRICS_LISTEN"),  # the gRPC address
        ({"QUOTAD_METRICS_FD": "7"}, "QUOTAD_METRICS_FD"),  # only with QUOTAD_METRICS_LISTEN
        (
            {"QUOTAD_METRICS_FD": "1", "QUOTAD_METRICS_LISTEN": "127.0.0.1:9091"},
            "QUOTAD_METRICS_FD",
        ),  # stdout
        ({"QUOTAD_POLICY_POLL_MS": "-1"}, "QUOTAD_POLICY_POLL_MS"),
        ({"QUOTAD_SHUTDOWN_DRAIN_MS": "soon"}, "QUOTAD_SHUTDOWN_DRAIN_MS"),
        ({"QUOTAD_REDIS_TLS_CERT_FILE": "c.pem", "QUOTAD_REDIS_URL": "rediss://r:6380"}, "TLS_KEY_FILE"),
        ({"QUOTAD_REDIS_TLS_CA_FILE": "ca.pem", "QUOTAD_REDIS_URL": "redis://r:6379"}, "rediss://"),
    ],
)
def test_bad_values_are_refused_by_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env({**BASE, **env})


def test_a_model_outside_the_policy_list_is_labelled_other() -> None:
    """Callers choose model names; labels must stay bounded by the policy, not by them."""
    policy = parse_policy("defaults: {tier: t}\ntiers: {t: {limits: []}}\n", "p.yaml")
    metrics = Metrics()
    outcome = ReserveOutcome(decision=Decision.DENIED, tenant="d", tier="t", limits=())
    for model in ("gpt-x-1", "gpt-x-2", ""):
        metrics.decided(policy, model, outcome)
    labels = {
        sample.labels["model"]
        for family in metrics.registry.collect()
        if family.name == "quotad_decisions"
        for sample in family.samples
        if sample.name == "quotad_decisions_total"
    }
    assert labels == {"other", ""}
