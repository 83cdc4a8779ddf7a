"""The Python client over TLS: the conformance scenario over mutual TLS, a bearer token over TLS,
and the refusals, against the live secure quotads of conftest.py (real TLS, real Valkey).

The other languages' suites check the same against the same two quotads (test_languages.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from quotad import QuotaClient, QuotadError, SyncQuotaClient, TlsConfig, Unavailable, pb
from quotad_server.auth import hash_token

from tests.clients.conftest import SecureQuotads
from tests.conformance.test_python_client import SCENARIO, replay
from tests.conftest import QuotadFactory
from tests.pki import Pki


def mtls(secure: SecureQuotads) -> TlsConfig:
    return TlsConfig(ca=secure.ca, cert=secure.client.cert, key=secure.client.key)


async def test_conformance_over_mutual_tls(secure_quotads: SecureQuotads) -> None:
    async with QuotaClient(secure_quotads.mtls.address, tls=mtls(secure_quotads), timeout=5) as client:
        await replay(client, SCENARIO, uuid.uuid4().hex[:8])


def test_the_blocking_client_over_mutual_tls_with_pem_bytes(secure_quotads: SecureQuotads) -> None:
    cert, key = secure_quotads.client.read()
    tls = TlsConfig(ca=secure_quotads.ca.read_bytes(), cert=cert, key=key)
    subject = f"py-sync-{uuid.uuid4().hex[:8]}"
    with SyncQuotaClient(secure_quotads.mtls.address, tls=tls, timeout=5) as client:
        with client.reserve(
            subject, tenant="sync", model="gpt-4o", input_tokens=10, max_output_tokens=5
        ) as held:
            held.record(input_tokens=10, output_tokens=5)
        usage = client.get_usage(subject, tenant="sync", model="gpt-4o")
    assert {limit.name: limit.remaining for limit in usage.limits}["tokens-per-day"] == 985


async def test_without_a_client_certificate_the_handshake_fails(secure_quotads: SecureQuotads) -> None:
    async with QuotaClient(
        secure_quotads.mtls.address, tls=TlsConfig(ca=secure_quotads.ca), timeout=5, retries=0
    ) as client:
        with pytest.raises(Unavailable):
            await client.check_and_reserve("nobody", model="gpt-4o", input_tokens=1)


async def test_a_server_certificate_the_ca_did_not_sign_is_refused(
    secure_quotads: SecureQuotads, tmp_path: Path
) -> None:
    other = Pki(tmp_path, "other")
    tls = TlsConfig(ca=other.ca, cert=secure_quotads.client.cert, key=secure_quotads.client.key)
    async with QuotaClient(secure_quotads.mtls.address, tls=tls, timeout=5, retries=0) as client:
        with pytest.raises(Unavailable):
            await client.check_and_reserve("nobody", model="gpt-4o", input_tokens=1)


@pytest.fixture
async def token_client(secure_quotads: SecureQuotads) -> AsyncIterator[QuotaClient]:
    async with QuotaClient(
        secure_quotads.token.address,
        tls=TlsConfig(ca=secure_quotads.ca),
        token=secure_quotads.bearer_token,
        timeout=5,
    ) as client:
        yield client


async def test_a_bearer_token_over_tls(token_client: QuotaClient) -> None:
    subject = f"py-token-{uuid.uuid4().hex[:8]}"
    decision = await token_client.check_and_reserve(
        subject, tenant="tokens", model="gpt-4o", input_tokens=10, max_output_tokens=5
    )
    assert decision.decision == pb.DECISION_ALLOWED
    assert decision.tenant == "tokens"
    committed = await token_client.commit(decision.reservation_id, input_tokens=10, output_tokens=1)
    assert committed.committed.output_tokens == 1


async def test_a_token_from_a_callable_is_asked_for_before_every_call(secure_quotads: SecureQuotads) -> None:
    asked: list[int] = []

    def current() -> str:
        asked.append(1)
        return secure_quotads.bearer_token

    async with QuotaClient(
        secure_quotads.token.address, tls=TlsConfig(ca=secure_quotads.ca), token=current, timeout=5
    ) as client:
        for _ in range(2):
            await client.get_usage("py-callable", tenant="tokens", model="gpt-4o")
    assert len(asked) == 2


@pytest.mark.parametrize("token", [None, "not-a-known-token"], ids=["no-token", "unknown-token"])
async def test_without_a_known_token_the_call_is_unauthenticated(
    secure_quotads: SecureQuotads, token: str | None
) -> None:
    async with QuotaClient(
        secure_quotads.token.address, tls=TlsConfig(ca=secure_quotads.ca), token=token, timeout=5
    ) as client:
        with pytest.raises(QuotadError) as refused:
            await client.get_usage("nobody", tenant="tokens", model="gpt-4o")
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_a_token_is_not_sent_over_plaintext_unless_allowed() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        QuotaClient("127.0.0.1:1", token="secret")
    with pytest.raises(ValueError, match="plaintext"):
        SyncQuotaClient("127.0.0.1:1", token=lambda: "secret")
    with pytest.raises(ValueError, match="both"):
        TlsConfig(cert="client.crt")
    with pytest.raises(ValueError, match="not both"):
        QuotaClient("127.0.0.1:1", tls=TlsConfig(), credentials=grpc.ssl_channel_credentials())
    with pytest.raises(FileNotFoundError):
        QuotaClient("127.0.0.1:1", tls=TlsConfig(ca="/nonexistent/ca.crt"))


async def test_a_token_allowed_over_plaintext_is_sent(quotad: QuotadFactory, tmp_path: Path) -> None:
    """Behind a mesh sidecar that encrypts for the client: `allow_plaintext_token=True`."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"sidecar-client {hash_token('sidecar-secret')}\n")
    policy = (Path(__file__).parents[1] / "conformance" / "policy.yaml").read_text()
    policy += '\ncallers:\n  sidecar-client: {tenants: {"*": {}}}\n'
    async with quotad(policy, tokens_file=tokens) as q:
        target = f"127.0.0.1:{q.port}"
        async with QuotaClient(
            target, token="sidecar-secret", allow_plaintext_token=True, timeout=5
        ) as client:
            usage = await client.get_usage("py-plain", tenant="sidecar", model="gpt-4o")
            assert usage.tenant == "sidecar"
        async with QuotaClient(target, timeout=5) as anonymous:
            with pytest.raises(QuotadError) as refused:
                await anonymous.get_usage("py-plain", tenant="sidecar", model="gpt-4o")
        assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
