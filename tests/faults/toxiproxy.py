"""Shopify's toxiproxy (`make tools` installs it) as a test fixture: a real TCP proxy that delays,
drops or cuts what crosses it, driven through its HTTP API.

It runs as a process of its own, so the delays it adds do not depend on the test's event loop.
Its random jitter is seeded: the same run gets the same sequence of delays.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from quotad_server.store.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261202


def binary() -> str:
    """The toxiproxy server: .tools/bin first (where `make tools` puts it), then PATH."""
    local = ROOT / ".tools" / "bin" / "toxiproxy-server"
    if local.exists():
        return str(local)
    found = shutil.which("toxiproxy-server")
    if found is None:
        raise RuntimeError("toxiproxy-server is not installed: run `make tools`")
    return found


class Toxiproxy:
    """One toxiproxy server on loopback. `with Toxiproxy() as proxy:`."""

    def __init__(self) -> None:
        self.api_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Toxiproxy:
        self._process = subprocess.Popen(
            [binary(), "-host", "127.0.0.1", "-port", str(self.api_port), "-seed", str(SEED)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    self._request("GET", "/version")
                    return self
                except OSError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("toxiproxy did not start") from None
                    time.sleep(0.02)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        for attempt in range(10):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    text = response.read()
                    if response.headers.get_content_type() != "application/json":
                        return text.decode()
                return json.loads(text) if text else None
            except urllib.error.HTTPError as error:
                # Toxiproxy answers 503 while it rewires many live links: ask again.
                if error.code != 503 or attempt == 9:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def proxy(self, name: str, upstream_port: int) -> int:
        """A proxy to 127.0.0.1:`upstream_port`; returns the port it listens on."""
        port = free_port()
        self._request(
            "POST",
            "/proxies",
            {"name": name, "listen": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{upstream_port}"},
        )
        return port

    def add(self, proxy: str, toxic: str, kind: str, stream: str, **attributes: int) -> None:
        """Add a toxic: `kind` latency (latency, jitter in ms) or timeout (timeout in ms, 0: hold
        everything until removed), on the `stream` "upstream" (to Redis) or "downstream"."""
        body = {"name": toxic, "type": kind, "stream": stream, "toxicity": 1.0, "attributes": attributes}
        self._request("POST", f"/proxies/{proxy}/toxics", body)

    def remove(self, proxy: str, toxic: str) -> None:
        self._request("DELETE", f"/proxies/{proxy}/toxics/{toxic}")

    def reset(self) -> None:
        """Every proxy enabled, every toxic removed."""
        self._request("POST", "/reset")
