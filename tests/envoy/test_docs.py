"""docs/envoy.md's grpcurl commands, run as written (but for the address) against `quotad serve`
with the example policy, as `make run` serves it."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from quotad_server.store.embedded import EmbeddedRedis

from tests.e2e.test_cli import Served, _serve, grpcurl_binary

DOCS = Path(__file__).resolve().parents[2] / "docs" / "envoy.md"


@pytest.fixture
def served(redis_server: EmbeddedRedis) -> Iterator[Served]:
    flush = redis.Redis.from_url(redis_server.url)
    flush.flushall()
    flush.close()
    server = _serve({"QUOTAD_REDIS_URL": redis_server.url})
    try:
        server.wait_serving()
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.communicate()


def run(block: str, served: Served, *, stop_on_error: bool = True) -> str:
    env = {**os.environ, "PATH": f"{Path(grpcurl_binary()).parent}{os.pathsep}{os.environ['PATH']}"}
    flags = "-euo" if stop_on_error else "-uo"
    result = subprocess.run(
        ["bash", flags, "pipefail", "-c", block.replace("localhost:50051", served.address)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if stop_on_error:
        assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def answers(output: str) -> list[dict[str, object]]:
    """The JSON answers grpcurl printed, one after the other."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (start := output.find("{\n", at)) >= 0:
        value, at = decoder.raw_decode(output, start)
        found.append(value)
    return found


def test_the_grpcurl_commands_of_docs_envoy_run_as_written(served: Served) -> None:
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert len(blocks) == 4, "docs/envoy.md has four sh blocks: list, a call, tokens, refusals"
    listed = run(blocks[0], served)
    assert "envoy.service.ratelimit.v3.RateLimitService\n" in listed
    assert "rpc ShouldRateLimit" in listed
    assert '"status": "SERVING"' in listed

    (first,) = answers(run(blocks[1], served))
    assert first["overall_code"] == "OK"
    statuses = first["statuses"]
    assert isinstance(statuses, list)
    assert statuses[1]["limit_remaining"] == 9

    check, charge, after = answers(run(blocks[2], served))
    assert (check["overall_code"], charge["overall_code"], after["overall_code"]) == (
        "OK",
        "OVER_LIMIT",
        "OVER_LIMIT",
    )
    headers = after["response_headers_to_add"]
    assert isinstance(headers, list)
    assert headers[0]["key"] == "retry-after"

    refused = run(blocks[3], served, stop_on_error=False)
    assert answers(refused)[0] == {"overall_code": "OK", "statuses": [{"code": "OK"}]}
    assert "model (descriptor entry 'model'): required: the policy names its models" in refused
    assert "unknown domain 'nope'; the policy's envoy.domains: llm-gateway, llm-gateway-tokens" in refused
