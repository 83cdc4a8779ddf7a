"""How a client reaches quotad: plaintext or TLS, a client certificate (mutual TLS), a bearer token.

Nothing here opens a connection: `transport()` turns the client's arguments into the channel
credentials, channel options and per-call metadata that `QuotaClient` and `SyncQuotaClient`
open their channel with, the same for both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from quotad._common import MetadataProvider

Pem = str | os.PathLike[str] | bytes
"""A PEM file's path (str or path-like), or the PEM itself (bytes)."""
Token = str | Callable[[], str]
"""A bearer token, or a callable that returns the current one (called before every attempt)."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS to quotad, and a client certificate for mutual TLS.

    - `ca`: the CA bundle that verifies quotad's certificate; None: the system's roots (or
      `GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`).
    - `cert` and `key`: a client certificate (chain) and its private key, for a quotad that
      requires one (`QUOTAD_TLS_CLIENT_CA`); both or neither. quotad knows the caller by the
      certificate's first SAN URI (a SPIFFE ID), else its first DNS name.
    - `server_name`: the name quotad's certificate must carry, when it is not the target's
      host (an IP address, a port-forward to localhost); e.g. "quotad.llm.svc".

    Each of `ca`, `cert` and `key` is a PEM file's path, or the PEM itself as bytes. Files are
    read once, when the client is made: a certificate renewed on disk takes a new client.
    """

    ca: Pem | None = None
    cert: Pem | None = None
    key: Pem | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "TlsConfig: a client certificate needs its key: set both cert and key, or neither"
            )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The files read now; OSError names a file that does not read."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key), certificate_chain=_read(self.cert)
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(source: Pem | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as file:
        return file.read()


@dataclass(frozen=True, slots=True)
class Transport:
    """What a client opens its channel with: credentials (None: plaintext), channel options, and
    metadata to add to every call (a bearer token, when it is allowed over plaintext)."""

    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    metadata_provider: MetadataProvider | None


def transport(
    *,
    tls: TlsConfig | None,
    credentials: grpc.ChannelCredentials | None,
    token: Token | None,
    allow_plaintext_token: bool,
    metadata_provider: MetadataProvider | None,
    options: Sequence[tuple[str, Any]],
    own_channel: bool,
) -> Transport:
    """Raises ValueError for arguments that do not go together, before any connection is made.

    Over TLS the token travels as gRPC call credentials, which gRPC sends on secure
    connections only. Over plaintext it is refused, unless `allow_plaintext_token` (a mesh
    sidecar that encrypts for the client, a test on loopback): then it is plain metadata.
    """
    if tls is not None and credentials is not None:
        raise ValueError("pass tls= or credentials=, not both")
    if own_channel and (tls is not None or token is not None):
        raise ValueError(
            "with channel=, set TLS and the token on that channel (tls= and token= open their own)"
        )
    if isinstance(token, str) and not token:
        raise ValueError("token is empty")
    channel_options = [*(tls.channel_options() if tls is not None else ()), *options]
    if tls is not None:
        credentials = tls.channel_credentials()
    if token is None:
        return Transport(credentials, channel_options, metadata_provider)
    if credentials is not None:
        call = (
            grpc.access_token_call_credentials(token)
            if isinstance(token, str)
            else grpc.metadata_call_credentials(_BearerToken(token), name="quotad-bearer-token")
        )
        return Transport(
            grpc.composite_channel_credentials(credentials, call), channel_options, metadata_provider
        )
    if not allow_plaintext_token:
        raise ValueError(
            "a bearer token over plaintext would travel in the clear: pass tls=TlsConfig(...) "
            "(or credentials=), or allow_plaintext_token=True where the network is trusted"
        )
    return Transport(None, channel_options, _with_token(token, metadata_provider))


def _bearer(token: Token) -> str:
    return f"Bearer {token() if callable(token) else token}"


def _with_token(token: Token, provider: MetadataProvider | None) -> MetadataProvider:
    def metadata() -> list[tuple[str, str]]:
        return [("authorization", _bearer(token)), *(provider() if provider is not None else ())]

    return metadata


class _BearerToken(grpc.AuthMetadataPlugin):
    """Call credentials from a callable token: asked before every call (gRPC runs it on its own
    thread). An exception it raises fails the call: UNAVAILABLE, retried as any."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            value = _bearer(self._token)
        except Exception as error:
            callback((), error)
            return
        callback((("authorization", value),), None)
