"""Every QUOTAD_* setting, read once at boot into one frozen object.

QUOTAD_LISTEN             host:port to serve gRPC on            (default 0.0.0.0:50051)
QUOTAD_POLICY             path of the policy YAML file          (required)
QUOTAD_REDIS_URL          redis:// or rediss:// URL; empty starts an embedded server (development)
QUOTAD_REDIS_TIMEOUT_MS   bound on every Redis call; past it UNAVAILABLE (default 250)
QUOTAD_KEY_PREFIX         prefix of every Redis key             (default quotad)
QUOTAD_LOG_FORMAT         json, console, or auto (json unless stderr is a terminal; default auto)
QUOTAD_LOG_LEVEL          debug, info, warning, error           (default info)
QUOTAD_HEALTH_INTERVAL_MS how often health re-checks Redis      (default 1000)
QUOTAD_SHUTDOWN_GRACE_S   how long in-flight RPCs get on SIGTERM (default 10)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

LogFormat = Literal["json", "console", "auto"]
_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """A QUOTAD_* variable has a bad value; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value}: expected {low} to {high}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    policy_path: str
    listen: str = "0.0.0.0:50051"
    redis_url: str = ""
    redis_timeout_ms: int = 250
    key_prefix: str = "quotad"
    log_format: LogFormat = "auto"
    log_level: str = "info"
    health_interval_ms: int = 1000
    shutdown_grace_s: int = 10
    workers: int = 1
    max_prompt_bytes: int = 1 << 20
    tiktoken_cache_dir: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        policy_path = env.get("QUOTAD_POLICY", "").strip()
        if not policy_path:
            raise SettingsError("QUOTAD_POLICY is not set: give the path of the policy YAML file")
        listen = env.get("QUOTAD_LISTEN", "").strip() or "0.0.0.0:50051"
        if not re.match(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]*):\d{1,5}$", listen):
            raise SettingsError(f"QUOTAD_LISTEN={listen!r}: expected host:port, e.g. 0.0.0.0:50051")
        redis_url = env.get("QUOTAD_REDIS_URL", "").strip()
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("QUOTAD_REDIS_URL: expected a redis://, rediss:// or unix:// URL")
        log_format = env.get("QUOTAD_LOG_FORMAT", "").strip() or "auto"
        if log_format not in ("json", "console", "auto"):
            raise SettingsError(f"QUOTAD_LOG_FORMAT={log_format!r}: expected json, console or auto")
        log_level = env.get("QUOTAD_LOG_LEVEL", "").strip().lower() or "info"
        if log_level not in _LEVELS:
            raise SettingsError(f"QUOTAD_LOG_LEVEL={log_level!r}: expected one of {', '.join(_LEVELS)}")
        key_prefix = env.get("QUOTAD_KEY_PREFIX", "").strip() or "quotad"
        if not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", key_prefix):
            raise SettingsError(f"QUOTAD_KEY_PREFIX={key_prefix!r}: letters, digits, '_', '-', '.'")
        return cls(
            policy_path=policy_path,
            listen=listen,
            redis_url=redis_url,
            redis_timeout_ms=_int(env, "QUOTAD_REDIS_TIMEOUT_MS", 250, 1, 60_000),
            key_prefix=key_prefix,
            log_format=log_format,  # type: ignore[arg-type]  # checked above
            log_level=log_level,
            health_interval_ms=_int(env, "QUOTAD_HEALTH_INTERVAL_MS", 1000, 50, 600_000),
            shutdown_grace_s=_int(env, "QUOTAD_SHUTDOWN_GRACE_S", 10, 0, 3600),
            workers=_int(env, "QUOTAD_WORKERS", 1, 1, 64),
            max_prompt_bytes=_int(env, "QUOTAD_MAX_PROMPT_BYTES", 1 << 20, 1, 64 << 20),
            tiktoken_cache_dir=env.get("TIKTOKEN_CACHE_DIR", "").strip(),
        )
