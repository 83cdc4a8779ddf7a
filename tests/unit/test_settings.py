"""QUOTAD_* settings are validated at boot with messages that name the variable."""

from __future__ import annotations

import pytest
from quotad_server.settings import Settings, SettingsError


def test_defaults() -> None:
    settings = Settings.from_env({"QUOTAD_POLICY": "p.yaml", "QUOTAD_REDIS_URL": "redis://redis:6379/0"})
    assert settings.listen == "0.0.0.0:50051"
    assert not settings.embedded_redis
    assert settings.redis_timeout_ms == 250
    assert settings.log_format == "auto"


def test_everything_can_be_set() -> None:
    settings = Settings.from_env(
        {
            "QUOTAD_POLICY": "/etc/quotad/policy.yaml",
            "QUOTAD_LISTEN": "[::]:6000",
            "QUOTAD_REDIS_URL": "rediss://redis.internal:6380/0",
            "QUOTAD_REDIS_TIMEOUT_MS": "100",
            "QUOTAD_KEY_PREFIX": "q1",
            "QUOTAD_LOG_FORMAT": "json",
            "QUOTAD_LOG_LEVEL": "WARNING",
            "QUOTAD_HEALTH_INTERVAL_MS": "500",
            "QUOTAD_SHUTDOWN_GRACE_S": "30",
        }
    )
    assert (settings.listen, settings.redis_timeout_ms, settings.log_level) == ("[::]:6000", 100, "warning")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "QUOTAD_POLICY"),
        ({"QUOTAD_REDIS_TIMEOUT_MS": "fast"}, "QUOTAD_REDIS_TIMEOUT_MS"),
        ({"QUOTAD_REDIS_TIMEOUT_MS": "0"}, "QUOTAD_REDIS_TIMEOUT_MS"),
        ({"QUOTAD_LISTEN": "50051"}, "QUOTAD_LISTEN"),
        ({"QUOTAD_REDIS_URL": "localhost:6379"}, "QUOTAD_REDIS_URL"),
        ({"QUOTAD_LOG_FORMAT": "xml"}, "QUOTAD_LOG_FORMAT"),
        ({"QUOTAD_LOG_LEVEL": "loud"}, "QUOTAD_LOG_LEVEL"),
        ({"QUOTAD_KEY_PREFIX": "a b"}, "QUOTAD_KEY_PREFIX"),
    ],
)
def test_bad_values_are_refused_by_name(env: dict[str, str], named: str) -> None:
    if named != "QUOTAD_POLICY":
        env = {"QUOTAD_POLICY": "p.yaml", "QUOTAD_REDIS_URL": "redis://redis:6379/0", **env}
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_without_a_redis_url_the_embedded_redis_must_be_asked_for_by_name() -> None:
    """A container started without QUOTAD_REDIS_URL refuses, instead of running a private Redis."""
    with pytest.raises(SettingsError, match=r"QUOTAD_REDIS_URL is not set.*QUOTAD_EMBEDDED_REDIS=true"):
        Settings.from_env({"QUOTAD_POLICY": "p.yaml"})
    settings = Settings.from_env({"QUOTAD_POLICY": "p.yaml", "QUOTAD_EMBEDDED_REDIS": "true"})
    assert settings.embedded_redis
    assert settings.redis_url == ""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUOTAD_EMBEDDED_REDIS": "sure"}, "QUOTAD_EMBEDDED_REDIS='sure': expected true or false"),
        (
            {"QUOTAD_EMBEDDED_REDIS": "true", "QUOTAD_REDIS_URL": "redis://redis:6379/0"},
            "set one or the other",
        ),
        ({"QUOTAD_EMBEDDED_REDIS": "false"}, "QUOTAD_REDIS_URL is not set"),
    ],
)
def test_the_embedded_redis_setting_is_checked(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"QUOTAD_POLICY": "p.yaml", **env})
