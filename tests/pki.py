"""Throwaway certificates for tests, made by the openssl command line (in Debian's base image).

A CA, server certificates for 127.0.0.1 and localhost, client certificates with the identities
a test needs (SAN URIs such as SPIFFE IDs, or DNS names), expired ones, and a second CA that
nobody trusts.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key (PEM files)."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


class Pki:
    """A CA in `directory`; `issue()` signs certificates with it."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        if shutil.which("openssl") is None:
            pytest.fail("openssl is needed to make test certificates: apt-get install openssl")
        self.directory = directory
        self.name = name
        self.ca = directory / f"{name}.crt"
        self._key = directory / f"{name}.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=quotad test {name}",
            "-keyout", str(self._key), "-out", str(self.ca), cwd=directory,
        )  # fmt: skip

    def issue(self, name: str, *, sans: str, client: bool = False, days: int = 2) -> Pair:
        """A certificate `name` with subjectAltName `sans` (e.g. "URI:spiffe://x,DNS:y"); `days`
        below zero makes one that has already expired."""
        stem = f"{self.name}-{name}"
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{stem}.key", "-out", f"{stem}.csr", cwd=self.directory,
        )  # fmt: skip
        usage = "clientAuth" if client else "serverAuth"
        (self.directory / f"{stem}.ext").write_text(f"subjectAltName={sans}\nextendedKeyUsage={usage}\n")
        _openssl(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", str(self.ca), "-CAkey", str(self._key),
            "-CAcreateserial", "-days", str(days), "-extfile", f"{stem}.ext", "-out", f"{stem}.crt",
            cwd=self.directory,
        )  # fmt: skip
        return Pair(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")

    def server(self, name: str = "server") -> Pair:
        return self.issue(name, sans="IP:127.0.0.1,DNS:localhost")
