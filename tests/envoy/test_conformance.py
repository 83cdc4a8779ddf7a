"""Envoy conformance: a Go client built from go-control-plane's stubs (the messages Envoy itself
sends) plays its scenarios (tests/envoy/conformance/main.go) against a `quotad serve` process on a
real Valkey, over a real socket: exactness across a window boundary, all or nothing across
descriptors, hits_addend, shadow limits."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from quotad_server.policy import parse_policy
from quotad_server.store.embedded import EmbeddedRedis

from tests.e2e.quotad_process import Process

CONFORMANCE = Path(__file__).parent / "conformance"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "envoy.md"


def go() -> str:
    found = shutil.which("go")
    if found is None:
        pytest.fail("go is not on PATH: the Envoy conformance client needs it (see the README)")
    return found


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conformance client, built (its modules download on the first build: `make tools` does it)."""
    binary = tmp_path_factory.mktemp("conformance") / "conformance"
    subprocess.run([go(), "build", "-o", str(binary), "."], cwd=CONFORMANCE, check=True, timeout=600)
    return binary


@pytest.fixture
async def quotad(tmp_path: Path) -> AsyncIterator[Process]:
    with EmbeddedRedis() as redis:
        process = Process(tmp_path, redis.url, CONFORMANCE / "policy.yaml")
        try:
            await process.wait_serving()
            yield process
        finally:
            await process.close()


@pytest.mark.slow
async def test_go_control_plane_client_conforms(client: Path, quotad: Process) -> None:
    command = [str(client), "-addr", f"127.0.0.1:{quotad.port}"]
    done = await asyncio.to_thread(
        subprocess.run, command, check=False, capture_output=True, text=True, timeout=120
    )
    results = {line["scenario"]: line for line in map(json.loads, done.stdout.splitlines())}
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(results) == {"boundary", "allornone", "hits", "shadow"}
    boundary = results["boundary"]["figures"]
    assert boundary["admitted"] == boundary["limit"] == 40
    assert boundary["straddled_boundary"]
    shadow_lines = [line for line in quotad.lines() if line.get("shadow_denied")]
    assert shadow_lines
    assert all(line["shadow_denied"] == ["new-limit"] for line in shadow_lines)


def test_the_documented_envoy_config_is_valid() -> None:
    """docs/envoy.md's Envoy configuration, parsed and validated as go-control-plane's messages."""
    done = subprocess.run(
        [go(), "test", "-count=1", "-run", "TestDocumentedEnvoyConfigIsValid", "."],
        cwd=CONFORMANCE,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_documented_policy_loads() -> None:
    found = re.search(r"<!-- quotad-policy -->\n```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert found is not None
    policy = parse_policy(found[1], "docs/envoy.md")
    assert policy.envoy is not None
    assert policy.envoy.domains["llm-gateway"].keys["subject"] == "user_id"
