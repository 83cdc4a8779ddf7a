"""TLS on the gRPC port: a certificate and key, and for mutual TLS a client CA, read from PEM files
and read again when they change (cert-manager rotates them in place), with no restart and no
connection dropped: gRPC asks for the configuration before every new handshake, and the
connections already open keep the one they were made with.
"""

from __future__ import annotations

import os
import ssl
import threading

import grpc
import structlog

_log = structlog.get_logger("quotad.tls")
_Stamp = tuple[tuple[int, int, int], ...]


class ServerTls:
    """The server's credentials from `cert` and `key` (PEM), requiring client certificates signed
    by `client_ca` when it is given. Raises ValueError at construction for files that do not
    make a valid configuration; a later change to such files is refused (logged) and the
    configuration in force stays."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self._paths = tuple(path for path in (cert, key, client_ca) if path)
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._initial = self._configuration()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,  # type: ignore[arg-type]  # grpc documents None (no change); types-grpcio does not
            require_client_authentication=bool(self._client_ca),
        )

    def _stamps(self) -> _Stamp:
        stamps = []
        for path in self._paths:
            try:
                stat = os.stat(path)  # follows the symlinks a mounted Secret swaps
                stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        try:
            # Check the pair (and the CA) the way a TLS server would load them, for a clear error.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self._cert, self._key)
            roots = None
            if self._client_ca:
                ssl.create_default_context(cafile=self._client_ca)
                with open(self._client_ca, "rb") as file:
                    roots = file.read()
            with open(self._cert, "rb") as cert, open(self._key, "rb") as key:
                pair = (key.read(), cert.read())
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"TLS files {', '.join(self._paths)}: {error}") from error
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before every new handshake, from its own threads: None keeps the
        configuration in force; a new one when the files have changed and make a valid one."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            self._stamp = stamp  # a refused change is refused once, not at every handshake
            try:
                configuration = self._configuration()
            except ValueError as error:
                _log.error(
                    "TLS files changed but do not load; serving the previous certificate", error=str(error)
                )
                return None
        _log.info("TLS certificate reloaded", cert=self._cert)
        return configuration
