"""Every QUOTAD_* setting, read once at boot into one frozen object.

QUOTAD_LISTEN             host:port to serve gRPC on            (default 0.0.0.0:50051)
QUOTAD_POLICY             path of the policy YAML file          (required)
QUOTAD_REDIS_URL          redis://, rediss:// or unix:// URL (required unless QUOTAD_EMBEDDED_REDIS);
                          for a Redis Cluster, one or more seed nodes: redis://h1:6379,h2:6379
QUOTAD_REDIS_CLUSTER      auto, true or false (default auto): true uses the cluster client (valkey-glide)
                          whatever the server says; auto uses it for a URL of several seeds, or when
                          the one server is a node of a Redis Cluster of several shards at start;
                          false never does (quotad's own client, one server or one shard)
QUOTAD_EMBEDDED_REDIS     true: with no QUOTAD_REDIS_URL, start a private embedded Valkey whose state
                          is lost on exit (development only; `make run` sets it). Default false
QUOTAD_REDIS_TIMEOUT_MS   bound on every Redis call; past it UNAVAILABLE (default 250)
QUOTAD_KEY_PREFIX         prefix of every Redis key             (default quotad)
QUOTAD_LOG_FORMAT         json, console, or auto (json unless stderr is a terminal; default auto)
QUOTAD_LOG_LEVEL          debug, info, warning, error           (default info)
QUOTAD_HEALTH_INTERVAL_MS how often health re-checks Redis while SERVING (default 1000);
                          every 100 ms while NOT_SERVING
QUOTAD_SHUTDOWN_GRACE_S   how long in-flight RPCs get on SIGTERM (default 10)
QUOTAD_SHUTDOWN_DRAIN_MS  on SIGTERM, how long health says NOT_SERVING while new RPCs are still
                          accepted, before they are refused (default 0)
QUOTAD_METRICS_LISTEN     host:port of the Prometheus /metrics endpoint; empty = off (default off)
QUOTAD_POLICY_POLL_MS     how often the policy file is checked for a new version; 0 = never
                          (default 1000)
QUOTAD_REDIS_PASSWORD     Redis password (AUTH), kept out of the URL; empty = the URL's, if any
QUOTAD_REDIS_TLS_CA_FILE  CA bundle that verifies a rediss:// server (default: the system's)
QUOTAD_REDIS_TLS_CERT_FILE, QUOTAD_REDIS_TLS_KEY_FILE
                          client certificate and key for Redis mutual TLS (both or neither)
QUOTAD_TLS_CERT, QUOTAD_TLS_KEY
                          PEM certificate (chain) and key: the gRPC port serves TLS only (both or
                          neither; re-read when the files change). Empty: plaintext (development)
QUOTAD_TLS_CLIENT_CA      PEM CA bundle: client certificates are required and verified (mTLS)
QUOTAD_TOKENS_FILE        hashed bearer tokens, '<identity> sha256:<hex>' a line (re-read on change)
QUOTAD_LOCAL_SOCKET       a Unix socket path quotad also serves on, plaintext, for probes and tools
                          inside the pod (`quotad health`); worker i of N listens on '<path>.<i>'
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

LogFormat = Literal["json", "console", "auto"]
_LEVELS = ("debug", "info", "warning", "error")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]*):\d{1,5}$")


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


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw not in _TRUE + _FALSE:
        raise SettingsError(f"{name}={raw!r}: expected true or false")
    return raw in _TRUE


def _embedded_redis(env: Mapping[str, str], redis_url: str) -> bool:
    """QUOTAD_EMBEDDED_REDIS, which only a missing QUOTAD_REDIS_URL may go with."""
    embedded = _bool(env, "QUOTAD_EMBEDDED_REDIS")
    if not redis_url and not embedded:
        # A private Redis in a container or a pod is a quota per replica, lost at every restart:
        # never what production wants, so it is asked for by name.
        raise SettingsError(
            "QUOTAD_REDIS_URL is not set: point it at your Redis (redis://, rediss:// or unix://);"
            " for development only, QUOTAD_EMBEDDED_REDIS=true starts a private embedded Valkey"
            " whose state is lost on exit"
        )
    if redis_url and embedded:
        raise SettingsError("QUOTAD_EMBEDDED_REDIS=true and QUOTAD_REDIS_URL: set one or the other")
    return embedded


def _redis_cluster(env: Mapping[str, str], redis_url: str, embedded_redis: bool) -> str:
    """QUOTAD_REDIS_CLUSTER, checked against the URL: several seeds only with auto or true."""
    redis_cluster = env.get("QUOTAD_REDIS_CLUSTER", "").strip().lower() or "auto"
    if redis_cluster not in ("auto", "true", "false"):
        raise SettingsError(f"QUOTAD_REDIS_CLUSTER={redis_cluster!r}: expected auto, true or false")
    seeds = "," in redis_url.partition("://")[2].partition("/")[0]
    if (seeds or redis_cluster == "true") and redis_url.startswith("unix://"):
        raise SettingsError("QUOTAD_REDIS_URL: a Redis Cluster is reached over redis:// or rediss://")
    if seeds and redis_cluster == "false":
        raise SettingsError(
            "QUOTAD_REDIS_URL lists several seed nodes, which only a Redis Cluster has:"
            " QUOTAD_REDIS_CLUSTER=false would talk to one of them; give one server, or auto or true"
        )
    if redis_cluster == "true" and embedded_redis:
        raise SettingsError(
            "QUOTAD_REDIS_CLUSTER=true needs QUOTAD_REDIS_URL (the embedded Valkey is one server)"
        )
    return redis_cluster


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
    shutdown_drain_ms: int = 0
    metrics_listen: str = ""
    metrics_fd: int = -1  # set by `quotad serve --workers N` for its workers, never by hand
    policy_poll_ms: int = 1000
    redis_password: str = field(default="", repr=False)  # never in a log line or a traceback
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tokens_file: str = ""
    local_socket: str = ""
    embedded_redis: bool = False
    redis_cluster: Literal["auto", "true", "false"] = "auto"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

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
        metrics_listen = env.get("QUOTAD_METRICS_LISTEN", "").strip()
        if metrics_listen and not _HOST_PORT.match(metrics_listen):
            raise SettingsError(
                f"QUOTAD_METRICS_LISTEN={metrics_listen!r}: expected host:port, e.g. 0.0.0.0:9090, or empty"
            )
        if metrics_listen and metrics_listen == listen:
            raise SettingsError(f"QUOTAD_METRICS_LISTEN={metrics_listen!r}: must differ from QUOTAD_LISTEN")
        metrics_fd = _int(env, "QUOTAD_METRICS_FD", -1, 3, 1 << 20)
        if metrics_fd >= 0 and not metrics_listen:
            raise SettingsError(
                "QUOTAD_METRICS_FD: set by `quotad serve --workers N` with QUOTAD_METRICS_LISTEN"
            )
        tls_cert = env.get("QUOTAD_REDIS_TLS_CERT_FILE", "").strip()
        tls_key = env.get("QUOTAD_REDIS_TLS_KEY_FILE", "").strip()
        if bool(tls_cert) != bool(tls_key):
            raise SettingsError(
                "QUOTAD_REDIS_TLS_CERT_FILE and QUOTAD_REDIS_TLS_KEY_FILE: set both (mutual TLS) or neither"
            )
        tls_ca = env.get("QUOTAD_REDIS_TLS_CA_FILE", "").strip()
        if (tls_ca or tls_cert) and not redis_url.startswith("rediss://"):
            raise SettingsError("QUOTAD_REDIS_TLS_*: TLS files need a rediss:// QUOTAD_REDIS_URL")
        embedded_redis = _embedded_redis(env, redis_url)
        redis_cluster = _redis_cluster(env, redis_url, embedded_redis)
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
            shutdown_drain_ms=_int(env, "QUOTAD_SHUTDOWN_DRAIN_MS", 0, 0, 600_000),
            metrics_listen=metrics_listen,
            metrics_fd=metrics_fd,
            policy_poll_ms=_int(env, "QUOTAD_POLICY_POLL_MS", 1000, 0, 3_600_000),
            embedded_redis=embedded_redis,
            redis_password=env.get("QUOTAD_REDIS_PASSWORD", ""),
            redis_tls_ca_file=tls_ca,
            redis_tls_cert_file=tls_cert,
            redis_tls_key_file=tls_key,
            redis_cluster=redis_cluster,  # type: ignore[arg-type]  # checked above
            **_serving_settings(env),
        )


def _serving_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The settings of who may connect, and how: TLS, tokens, the local socket."""
    cert, key = env.get("QUOTAD_TLS_CERT", "").strip(), env.get("QUOTAD_TLS_KEY", "").strip()
    if bool(cert) != bool(key):
        raise SettingsError("QUOTAD_TLS_CERT and QUOTAD_TLS_KEY: set both (TLS) or neither (plaintext)")
    client_ca = env.get("QUOTAD_TLS_CLIENT_CA", "").strip()
    if client_ca and not cert:
        raise SettingsError("QUOTAD_TLS_CLIENT_CA: client certificates need TLS (QUOTAD_TLS_CERT, _KEY)")
    tokens = env.get("QUOTAD_TOKENS_FILE", "").strip()
    for name, path in (
        ("QUOTAD_TLS_CERT", cert),
        ("QUOTAD_TLS_KEY", key),
        ("QUOTAD_TLS_CLIENT_CA", client_ca),
        ("QUOTAD_TOKENS_FILE", tokens),
    ):
        if path and not os.path.isfile(path):
            raise SettingsError(f"{name}={path!r}: no such file")
    local_socket = env.get("QUOTAD_LOCAL_SOCKET", "").strip()
    if local_socket and not os.path.isabs(local_socket):
        raise SettingsError(f"QUOTAD_LOCAL_SOCKET={local_socket!r}: expected an absolute path")
    return {
        "tls_cert": cert,
        "tls_key": key,
        "tls_client_ca": client_ca,
        "tokens_file": tokens,
        "local_socket": local_socket,
    }
