"""A live quotad for the other languages' tests: `python -m quotad_server serve` on a real Valkey.

The TypeScript, Go and Java suites reach it through $QUOTAD_ADDR; they fail, never skip,
when it is not set or not answering. Their outage tests pause its Valkey (SIGSTOP, then
SIGCONT) through $QUOTAD_REDIS_PID: each suite runs its tests one at a time, so no other
test of it is under way meanwhile. Their server-side waiting tests read the waiting lines
from that Valkey, at $QUOTAD_REDIS_ADDR (host:port), to know when a request waits in line.

Two more quotads serve the same policy over TLS, with a `callers:` section that names the
clients (`secure_quotads`, shared by every suite of the session): one requires client
certificates (mutual TLS) and knows its caller by the certificate's SPIFFE ID; the other
serves TLS without asking for one and knows its caller by a bearer token. Every suite replays
the conformance scenario over mutual TLS and checks both refusals (no client certificate: the
handshake fails; no token: UNAUTHENTICATED), through the variables of `SecureQuotads.env`:
$QUOTAD_MTLS_ADDR, $QUOTAD_TOKEN_ADDR, $QUOTAD_TLS_CA (the CA that signed both quotads'
certificates), $QUOTAD_CLIENT_CERT and $QUOTAD_CLIENT_KEY (a certificate that CA signed for
the client), $QUOTAD_TOKEN. (Not QUOTAD_TLS_CERT and _KEY: those are the server's own.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from quotad_server.auth import hash_token
from quotad_server.store.embedded import EmbeddedRedis, free_port

from tests.pki import Pair, Pki

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_POLICY = ROOT / "tests" / "conformance" / "policy.yaml"
EXAMPLE_POLICY = ROOT / "server" / "quotad_server" / "examples" / "policy.yaml"
MAVEN_REPO = ROOT / ".tools" / "m2"


@dataclass
class LiveQuotad:
    """A quotad process; `env` is the environment to run a client's tests in."""

    address: str
    redis: EmbeddedRedis
    process: subprocess.Popen[str]

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "QUOTAD_ADDR": self.address,
            "QUOTAD_REDIS_PID": str(self.redis_pid),
            "QUOTAD_REDIS_ADDR": f"127.0.0.1:{self.redis.port}",
        }

    @property
    def redis_pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid


def wait_serving(
    address: str,
    process: subprocess.Popen[str],
    log: Path,
    timeout_s: float = 30,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    opened = (
        grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    )
    with opened as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"quotad exited with {process.returncode}:\n{log.read_text()}")
            try:
                answer = check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    pytest.fail(f"quotad at {address} did not become SERVING within {timeout_s} s:\n{log.read_text()}")


def serve(
    policy: Path,
    log: Path,
    extra_env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[LiveQuotad]:
    """quotad on a Valkey of its own; `extra_env` configures it further (TLS), `credentials`
    are the ones its health is checked with until it serves."""
    with EmbeddedRedis() as store, log.open("w") as log_file:
        address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "QUOTAD_POLICY": str(policy),
            "QUOTAD_LISTEN": address,
            "QUOTAD_REDIS_URL": store.url,
            "QUOTAD_LOG_LEVEL": "warning",
            "QUOTAD_SHUTDOWN_GRACE_S": "1",
            **(extra_env or {}),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "quotad_server", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_serving(address, process, log, credentials=credentials)
            yield LiveQuotad(address, store, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def conformance_quotad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveQuotad]:
    """quotad with tests/conformance/policy.yaml: what every client's own suite expects."""
    yield from serve(CONFORMANCE_POLICY, tmp_path_factory.mktemp("quotad") / "quotad.log")


# The client the secure quotads know: by its certificate's SAN URI over mutual TLS, by its token
# over TLS. Both may act for any tenant (the scenario's tenant has a run id in its name).
CLIENT_SPIFFE_ID = "spiffe://quotad.test/ns/conformance/sa/client"
TOKEN_IDENTITY = "conformance-token-client"
CALLERS = f"""
# Added by tests/clients/conftest.py for the secure quotads: who the clients are.
callers:
  "{CLIENT_SPIFFE_ID}": {{tenants: {{"*": {{}}}}}}
  {TOKEN_IDENTITY}: {{tenants: {{"*": {{}}}}}}
"""


@dataclass
class SecureQuotads:
    """quotad over mutual TLS, and quotad over TLS with bearer tokens, and what their client holds."""

    mtls: LiveQuotad
    token: LiveQuotad
    ca: Path
    client: Pair
    bearer_token: str

    @property
    def env(self) -> dict[str, str]:
        """What a client's suite reaches both with (see the module's doc)."""
        return {
            "QUOTAD_MTLS_ADDR": self.mtls.address,
            "QUOTAD_TOKEN_ADDR": self.token.address,
            "QUOTAD_TLS_CA": str(self.ca),
            "QUOTAD_CLIENT_CERT": str(self.client.cert),
            "QUOTAD_CLIENT_KEY": str(self.client.key),
            "QUOTAD_TOKEN": self.bearer_token,
        }


@pytest.fixture(scope="session")
def secure_quotads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureQuotads]:
    """Both secure quotads, on certificates made for this session (tests/pki.py)."""
    root = tmp_path_factory.mktemp("secure-quotads")
    pki = Pki(root)
    server = pki.server()
    client = pki.issue("client", sans=f"URI:{CLIENT_SPIFFE_ID}", client=True)
    token = f"token-{os.urandom(16).hex()}"
    (root / "tokens").write_text(f"{TOKEN_IDENTITY} {hash_token(token)}\n")
    policy = root / "policy.yaml"
    policy.write_text(CONFORMANCE_POLICY.read_text() + CALLERS)
    tls = {"QUOTAD_TLS_CERT": str(server.cert), "QUOTAD_TLS_KEY": str(server.key)}
    ca = pki.ca.read_bytes()
    cert, key = client.read()
    with ExitStack() as stack:
        mtls = stack.enter_context(
            contextmanager(serve)(
                policy,
                root / "mtls.log",
                {**tls, "QUOTAD_TLS_CLIENT_CA": str(pki.ca)},
                grpc.ssl_channel_credentials(ca, key, cert),
            )
        )
        tokens = stack.enter_context(
            contextmanager(serve)(
                policy,
                root / "token.log",
                {**tls, "QUOTAD_TOKENS_FILE": str(root / "tokens")},
                grpc.ssl_channel_credentials(ca),
            )
        )
        yield SecureQuotads(mtls, tokens, pki.ca, client, token)


@pytest.fixture(scope="module")
def clients_env(conformance_quotad: LiveQuotad, secure_quotads: SecureQuotads) -> dict[str, str]:
    """The environment a client's suite runs in: the conformance quotad, and both secure ones."""
    return {**conformance_quotad.env, **secure_quotads.env}


@pytest.fixture(scope="module")
def example_quotad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveQuotad]:
    """quotad with the example policy, as `make run` serves it: what the READMEs' examples expect."""
    yield from serve(EXAMPLE_POLICY, tmp_path_factory.mktemp("quotad") / "quotad.log")


def run(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 600) -> str:
    """Run a client's test command; fail with its output unless it exits 0."""
    try:
        result = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    finally:
        if "QUOTAD_REDIS_PID" in env:  # an outage test that was cut short may have left it paused
            os.kill(int(env["QUOTAD_REDIS_PID"]), signal.SIGCONT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`{' '.join(command)}` in {cwd} exited {result.returncode}:\n{output}"
    return output
