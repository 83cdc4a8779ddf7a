"""The README's commands for real: `quotad serve` as a process, grpcurl against it (in plaintext, and
over mutual TLS with a bearer token), `quotad check-policy`."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from quotad_server.auth import hash_token
from quotad_server.store.embedded import EmbeddedRedis, free_port

from tests.metrics_scrape import scrape, value
from tests.pki import Pki

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = ROOT / "server" / "quotad_server" / "examples" / "policy.yaml"
QUOTAD = [sys.executable, "-m", "quotad_server"]


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or str(ROOT / ".tools" / "bin" / "grpcurl")
    if not Path(found).exists():
        pytest.fail("grpcurl is not installed: `make tools` installs it into .tools/bin")
    return found


class Served:
    """A `quotad serve` process, and grpcurl against it with `security`: its TLS flags, or -plaintext."""

    def __init__(
        self, process: subprocess.Popen[str], address: str, security: tuple[str, ...] = ("-plaintext",)
    ) -> None:
        self.process = process
        self.address = address
        self.security = security

    def grpcurl(self, *args: str, data: dict[str, object] | None = None) -> str:
        command = [grpcurl_binary(), *self.security, "-max-time", "10"]
        if data is not None:
            command += ["-d", json.dumps(data)]
        result = subprocess.run(
            [*command, self.address, *args], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def wait_serving(self) -> None:
        # Generous: a loaded 2-core machine has taken more than 20 s to start two workers.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read() if self.process.stderr else ""
            result = subprocess.run(
                [
                    grpcurl_binary(),
                    *self.security,
                    "-max-time",
                    "2",
                    self.address,
                    "grpc.health.v1.Health/Check",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if '"SERVING"' in result.stdout:
                return
            time.sleep(0.1)
        pytest.fail("quotad did not become SERVING within 60 s")

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=20)
        return self.process.returncode, stderr


def _serve(extra_env: dict[str, str], security: tuple[str, ...] = ("-plaintext",)) -> Served:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "QUOTAD_POLICY": str(EXAMPLE_POLICY),
        "QUOTAD_LISTEN": address,
        "QUOTAD_LOG_FORMAT": "json",
        "QUOTAD_SHUTDOWN_GRACE_S": "2",
        **extra_env,
    }
    process = subprocess.Popen([*QUOTAD, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    return Served(process, address, security)


@pytest.fixture
def served(redis_server: EmbeddedRedis) -> Iterator[Served]:
    server = _serve({"QUOTAD_REDIS_URL": redis_server.url})
    try:
        server.wait_serving()
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.communicate()


def test_grpcurl_lists_describes_and_calls_the_service(served: Served) -> None:
    services = served.grpcurl("list").split()
    assert "quotad.v1.QuotaService" in services
    assert "grpc.health.v1.Health" in services
    assert "rpc CheckAndReserve" in served.grpcurl("describe", "quotad.v1.QuotaService")

    request = {"subject": "alice", "model": "gpt-4o", "input_tokens": 300, "max_output_tokens": 100}
    reserved = json.loads(served.grpcurl("quotad.v1.QuotaService/CheckAndReserve", data=request))
    assert reserved["decision"] == "DECISION_ALLOWED"

    usage = json.loads(
        served.grpcurl("quotad.v1.QuotaService/GetUsage", data={"subject": "alice", "model": "gpt-4o"})
    )
    remaining = {limit["name"]: int(limit["remaining"]) for limit in usage["limits"]}
    # The reservation shows: its slot is held (leases do not refill), its 400 tokens are charged
    # (less what the bucket refilled meanwhile, a few tokens per second).
    assert remaining["in-flight"] <= 1
    assert remaining["tokens-per-minute"] <= 650

    commit = {"reservation_id": reserved["reservation_id"], "input_tokens": 300, "output_tokens": 20}
    committed = json.loads(served.grpcurl("quotad.v1.QuotaService/Commit", data=commit))
    assert committed["committed"]["output_tokens"] == "20"  # grpcurl prints int64 as strings

    code, stderr = served.stop()
    assert code == 0
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    rpc_lines = [line for line in lines if line.get("event") == "rpc"]
    assert {"CheckAndReserve", "GetUsage", "Commit"} <= {line["method"] for line in rpc_lines}
    decision = next(line for line in rpc_lines if line["method"] == "CheckAndReserve")
    assert {"subject", "tenant", "decision", "latency_ms"} <= set(decision)


def test_serve_without_redis_url_refuses_unless_the_embedded_server_is_asked_for() -> None:
    """A container started without QUOTAD_REDIS_URL must not run a private Redis by surprise."""
    env = {**os.environ, "QUOTAD_POLICY": str(EXAMPLE_POLICY), "QUOTAD_REDIS_URL": ""}
    env.pop("QUOTAD_EMBEDDED_REDIS", None)
    result = subprocess.run(
        [*QUOTAD, "serve"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "QUOTAD_REDIS_URL is not set" in result.stderr
    assert "QUOTAD_EMBEDDED_REDIS=true" in result.stderr


def test_serve_with_the_embedded_redis_asked_for_starts_one() -> None:
    server = _serve({"QUOTAD_REDIS_URL": "", "QUOTAD_EMBEDDED_REDIS": "true"})
    try:
        server.wait_serving()
        reserved = server.grpcurl(
            "quotad.v1.QuotaService/CheckAndReserve",
            data={"subject": "bob", "model": "gpt-4o-mini", "max_output_tokens": 100},
        )
        assert "DECISION_ALLOWED" in reserved
    finally:
        code, stderr = server.stop()
    assert code == 0
    assert "embedded Valkey server" in stderr


def test_serve_refuses_a_bad_policy_naming_file_path_and_value(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text(EXAMPLE_POLICY.read_text().replace("period: 1h", "period: 1 hour"))
    env = {
        **os.environ,
        "QUOTAD_POLICY": str(bad),
        "QUOTAD_LOG_FORMAT": "console",
        "QUOTAD_EMBEDDED_REDIS": "true",
    }
    result = subprocess.run(
        [*QUOTAD, "serve"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "tiers.free.limits[1].period" in result.stderr
    assert "'1 hour'" in result.stderr


def test_serve_refuses_one_node_of_a_redis_cluster_of_several_shards_without_the_cluster_client(
    two_shard_cluster: list[EmbeddedRedis],
) -> None:
    env = {
        **os.environ,
        "QUOTAD_POLICY": str(EXAMPLE_POLICY),
        "QUOTAD_LISTEN": f"127.0.0.1:{free_port()}",
        "QUOTAD_REDIS_URL": two_shard_cluster[0].url,
        "QUOTAD_REDIS_CLUSTER": "false",  # auto (the default) switches to the cluster client instead
        "QUOTAD_LOG_FORMAT": "json",
    }
    result = subprocess.run(
        [*QUOTAD, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    refused = [json.loads(line) for line in result.stderr.splitlines() if "Redis Cluster" in line]
    assert refused
    assert refused[0]["level"] == "error"
    assert refused[0]["cluster_shards"] == 2


def test_serve_without_a_policy_says_what_is_missing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAD_")}
    result = subprocess.run(
        [*QUOTAD, "serve"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "QUOTAD_POLICY" in result.stderr


def test_check_policy_offline(tmp_path: Path) -> None:
    ok = subprocess.run(
        [*QUOTAD, "check-policy", str(EXAMPLE_POLICY)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "defaults: {tier: free}\ntiers:\n  free:\n    limits:\n      - {name: x, metric: tokens, limit: 5}\n"
    )
    result = subprocess.run([*QUOTAD, "check-policy", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert f"{bad}: tiers.free.limits[0].metric: unknown metric 'tokens'" in result.stderr


def _logged(path: Path, event: str, timeout_s: float = 20) -> dict[str, Any]:
    """The first JSON log line of `event` written to `path`, waiting for it up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == event:
                found: dict[str, Any] = json.loads(line)
                return found
        time.sleep(0.02)
    pytest.fail(f"no {event!r} log line within {timeout_s} s")


def test_serve_with_workers_shares_one_port_and_stops_together(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    metrics_port = free_port()
    env = {
        **os.environ,
        "QUOTAD_POLICY": str(EXAMPLE_POLICY),
        "QUOTAD_LISTEN": address,
        "QUOTAD_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "QUOTAD_REDIS_URL": redis_server.url,
        "QUOTAD_LOG_FORMAT": "json",
        "QUOTAD_SHUTDOWN_GRACE_S": "2",
    }
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr_file:
        process = subprocess.Popen(
            [*QUOTAD, "serve", "--workers", "2"], env=env, stderr=stderr_file, text=True
        )
    server = Served(process, address)
    try:
        # The workers' metrics ports are taken from the start, before any worker has booted: the
        # supervisor binds them and hands the sockets down, so no other process can take one between.
        started = _logged(log, "workers started")
        assert len(started["metrics_ports"]) == 2
        for port in started["metrics_ports"]:
            with socket.socket() as squatter, pytest.raises(OSError, match="in use") as taken:
                squatter.bind(("127.0.0.1", port))
            assert taken.value.errno == errno.EADDRINUSE
        server.wait_serving()
        for i in range(20):  # new connections spread over both workers; every one is served
            request = {
                "subject": f"user-{i}",
                "model": "gpt-4o-mini",
                "input_tokens": 5,
                "max_output_tokens": 5,
            }
            assert "DECISION_ALLOWED" in server.grpcurl(
                "quotad.v1.QuotaService/CheckAndReserve", data=request
            )
        # One metrics port for the set: every worker's series, labelled with its worker.
        samples = scrape(metrics_port)
        assert value(samples, "quotad_worker_up", {"worker": "0"}) == 1
        assert value(samples, "quotad_worker_up", {"worker": "1"}) == 1
        assert value(samples, "quotad_decisions_total", {"decision": "allowed"}) == 20  # summed over workers
        decided = [dict(labels) for name, labels in samples if name == "quotad_decisions_total"]
        assert decided
        assert all(labels["worker"] in ("0", "1") for labels in decided)
    finally:
        code, _ = server.stop()
    assert code == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert len(started["pids"]) == 2
    serving_pids = {line["pid"] for line in lines if line.get("event") == "serving"}
    assert serving_pids == set(started["pids"])
    assert sum(line.get("event") == "stopped" for line in lines) == 2


def readme_operating_blocks() -> list[str]:
    """The sh blocks of the README's "Operating quotad" section, as an operator would paste them:
    in plaintext (against `make run`), then over TLS."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Operating quotad\n", 1)[1].split("\n## ", 1)[0]
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2, "the Operating quotad section has two sh blocks: plaintext, then TLS"
    return blocks


def test_readme_operating_commands_run_as_written(served: Served, redis_server: EmbeddedRedis) -> None:
    block = readme_operating_blocks()[0]
    for command in (" list", " describe", "Health/Check", "/CheckAndReserve", "/GetUsage", "/Commit"):
        assert command in block, f"the README lost its {command.strip()} command"
    flush = redis.Redis.from_url(redis_server.url)
    flush.flushall()
    flush.close()

    env = {**os.environ, "QUOTAD_ADDR": served.address}
    env["PATH"] = f"{Path(grpcurl_binary()).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "quotad.v1.QuotaService\n" in out
    assert "rpc CheckAndReserve ( .quotad.v1.CheckAndReserveRequest )" in out
    assert '"status": "SERVING"' in out
    assert '"decision": "DECISION_ALLOWED"' in out
    assert '"remaining": "500"' in out  # GetUsage: tokens-per-minute after reserving 500 of 1000
    committed = json.loads(out[out.rindex('{\n  "reserved"') :])
    # Priced from the catalog at gpt-4o's $2.50 / $10 per million: 300 * 2.5 + 97 * 10 micro-dollars.
    assert committed["committed"] == {
        "requests": "1",
        "input_tokens": "300",
        "output_tokens": "97",
        "cost_micro_usd": "1720",
    }


# The TLS block's quotad: mutual TLS with a certificate for the name the README gives -authority, and
# a tokens file. The client certificate acts for any tenant; the token's caller may only read.
README_SERVER_NAME = "quotad.llm.svc"
README_CLIENT = "spiffe://quotad.test/ns/docs/sa/grpcurl"
README_TOKEN_CALLER = "docs-reader"
README_CALLERS = f"""
callers:
  "{README_CLIENT}": {{tenants: {{"*": {{}}}}}}
  {README_TOKEN_CALLER}: {{tenants: {{"*": {{}}}}, methods: [read]}}
"""


@dataclass
class ServedTls:
    served: Served
    files: Path  # ca.crt, client.crt, client.key, as the README names them
    token: str


@pytest.fixture
def served_tls(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[ServedTls]:
    pki = Pki(tmp_path)
    server = pki.issue("server", sans=f"DNS:{README_SERVER_NAME},IP:127.0.0.1")
    client = pki.issue("client", sans=f"URI:{README_CLIENT}", client=True)
    files = tmp_path / "grpcurl"
    files.mkdir()
    for source, name in ((pki.ca, "ca.crt"), (client.cert, "client.crt"), (client.key, "client.key")):
        shutil.copy(source, files / name)
    token = f"docs-{os.urandom(8).hex()}"
    (tmp_path / "tokens").write_text(f"{README_TOKEN_CALLER} {hash_token(token)}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(EXAMPLE_POLICY.read_text() + README_CALLERS)
    env = {
        "QUOTAD_REDIS_URL": redis_server.url,
        "QUOTAD_POLICY": str(policy),
        "QUOTAD_TLS_CERT": str(server.cert),
        "QUOTAD_TLS_KEY": str(server.key),
        "QUOTAD_TLS_CLIENT_CA": str(pki.ca),
        "QUOTAD_TOKENS_FILE": str(tmp_path / "tokens"),
    }
    served = _serve(env, security=_tls_flags(files, certificate=True))
    try:
        served.wait_serving()
        yield ServedTls(served, files, token)
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.communicate()


def _tls_flags(files: Path, *, certificate: bool) -> tuple[str, ...]:
    """grpcurl's flags for the TLS quotad: its CA and name, and the client certificate."""
    flags: tuple[str, ...] = ("-cacert", str(files / "ca.crt"), "-authority", README_SERVER_NAME)
    if certificate:
        flags += ("-cert", str(files / "client.crt"), "-key", str(files / "client.key"))
    return flags


def test_readme_tls_commands_run_as_written(served_tls: ServedTls, redis_server: EmbeddedRedis) -> None:
    block = readme_operating_blocks()[1]
    for part in (
        "-cacert ca.crt",
        "-cert client.crt",
        "-key client.key",
        "-authority",
        "authorization: Bearer",
    ):
        assert part in block, f"the README's TLS block lost its {part}"
    flush = redis.Redis.from_url(redis_server.url)
    flush.flushall()
    flush.close()

    env = {**os.environ, "QUOTAD_ADDR": served_tls.served.address, "QUOTAD_TOKEN": served_tls.token}
    env["PATH"] = f"{Path(grpcurl_binary()).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=served_tls.files,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert '"status": "SERVING"' in out
    assert '"decision": "DECISION_ALLOWED"' in out
    assert out.count('"name": "tokens-per-minute"') == 2  # CheckAndReserve's limits, then GetUsage's

    # The token named the caller, not the certificate: it may read, not reserve.
    bearer = ("-H", f"authorization: Bearer {served_tls.token}")
    refused = _grpcurl_tls(
        served_tls, *bearer, "-d", '{"subject": "bob"}', "quotad.v1.QuotaService/CheckAndReserve"
    )
    assert refused.returncode != 0
    assert "PermissionDenied" in refused.stderr, refused.stderr
    # Without a client certificate, no handshake.
    anonymous = _grpcurl_tls(served_tls, "grpc.health.v1.Health/Check", certificate=False)
    assert anonymous.returncode != 0
    assert "SERVING" not in anonymous.stdout


def _grpcurl_tls(
    served_tls: ServedTls, *args: str, certificate: bool = True
) -> subprocess.CompletedProcess[str]:
    """grpcurl `args` (options, then the method) against the TLS quotad; its exit code not checked."""
    flags = _tls_flags(served_tls.files, certificate=certificate)
    *options, method = args
    return subprocess.run(
        [grpcurl_binary(), *flags, "-max-time", "10", *options, served_tls.served.address, method],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
