"""The conformance scenario, replayed through the Python client against a live quotad.

The TypeScript, Go and Java clients replay the same scenario.json (tests/clients/);
all four must agree with it. Each also replays it over mutual TLS against the secure quotad of
tests/clients/conftest.py (Python: tests/clients/test_python_tls.py, with `replay` from here).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from quotad import InvalidArgument, QuotaClient, QuotadError, pb

from tests.conftest import QuotadFactory

HERE = Path(__file__).parent
SCENARIO: dict[str, Any] = json.loads((HERE / "scenario.json").read_text())
POLICY = (HERE / SCENARIO["policy"]).read_text()
EXPECT_KEYS = {
    "decision",
    "deny_reason",
    "binding_limit",
    "retry_after",
    "reserved",
    "committed",
    "refunded",
    "remaining",
    "replayed",
    "repeat",
    "same_reservation_as",
    "error",
    "field_violations",
}


def cost(message: pb.Cost) -> dict[str, int]:
    return {
        "requests": message.requests,
        "input_tokens": message.input_tokens,
        "output_tokens": message.output_tokens,
    }


def observe(response: Any, saved: dict[str, str]) -> dict[str, Any]:
    """The scenario's view of a response: every key an expectation may name."""
    seen: dict[str, Any] = {}
    if isinstance(response, pb.CheckAndReserveResponse):
        seen["decision"] = pb.Decision.Name(response.decision).removeprefix("DECISION_")
        if response.deny_reason:
            seen["deny_reason"] = pb.DenyReason.Name(response.deny_reason).removeprefix("DENY_REASON_")
        seen["binding_limit"] = response.binding_limit
        seen["retry_after"] = response.HasField("retry_after")
        seen["reserved"] = cost(response.reserved)
        seen["replayed"] = response.replayed
        seen["reservation_id"] = response.reservation_id
    elif isinstance(response, pb.CommitResponse):
        seen.update(
            repeat=response.repeat, reserved=cost(response.reserved), committed=cost(response.committed)
        )
    elif isinstance(response, pb.ReleaseResponse):
        seen.update(repeat=response.repeat, refunded=cost(response.refunded))
    if isinstance(response, pb.CheckAndReserveResponse | pb.GetUsageResponse):
        seen["remaining"] = {status.name: status.remaining for status in response.limits}
    return seen


async def replay(client: QuotaClient, scenario: dict[str, Any], run_id: str) -> None:
    subject, tenant = f"{scenario['subject']}-{run_id}", f"{scenario['tenant']}-{run_id}"
    saved: dict[str, str] = {}
    for index, step in enumerate(scenario["steps"]):
        where = f"step {index} ({step['call']})"
        expect: dict[str, Any] = step["expect"]
        assert set(expect) <= EXPECT_KEYS, f"{where}: unknown expectation {set(expect) - EXPECT_KEYS}"
        seen: dict[str, Any]
        try:
            if step["call"] == "reserve":
                response: Any = await client.check_and_reserve(
                    subject,
                    tenant=tenant,
                    model=scenario["model"],
                    input_tokens=step["input_tokens"],
                    max_output_tokens=step["max_output_tokens"],
                    idempotency_key=step.get("idempotency_key", ""),
                )
            elif step["call"] == "commit":
                response = await client.commit(
                    saved[step["reservation"]],
                    input_tokens=step["input_tokens"],
                    output_tokens=step["output_tokens"],
                )
            elif step["call"] == "release":
                response = await client.release(saved[step["reservation"]])
            elif step["call"] == "usage":
                response = await client.get_usage(subject, tenant=tenant, model=scenario["model"])
            else:
                raise AssertionError(f"{where}: unknown call")
            seen = observe(response, saved)
        except QuotadError as error:
            seen = {"error": error.code.name}
            if isinstance(error, InvalidArgument):
                seen["field_violations"] = [v.field for v in error.field_violations]
        if "save_as" in step:
            saved[step["save_as"]] = seen["reservation_id"]
        if "same_reservation_as" in expect:
            seen["same_reservation_as"] = next(
                (name for name, rid in saved.items() if rid == seen.get("reservation_id")), None
            )
        for key, want in expect.items():
            assert seen.get(key) == want, f"{where}: {key} is {seen.get(key)!r}, expected {want!r}"


async def test_python_client_conformance(quotad: QuotadFactory) -> None:
    async with quotad(POLICY) as q, QuotaClient(f"127.0.0.1:{q.port}", timeout=5) as client:
        await replay(client, SCENARIO, uuid.uuid4().hex[:8])
