"""`quotad.celery` without a worker: what a run asks for, and the options it refuses."""

from __future__ import annotations

from datetime import timedelta

import pytest
from quotad import SyncQuotaClient, pb
from quotad.celery import TaskDenied, TaskQuota


def no_client() -> SyncQuotaClient:
    raise AssertionError("not called here")


def test_a_run_asks_for_what_the_task_arguments_say() -> None:
    quota = TaskQuota(
        client=no_client,
        subject=lambda user, text, **_: user,
        tier="batch",
        model="gpt-4o",
        input_tokens=lambda user, text, **_: len(text),
        max_output_tokens=lambda user, text, *, answer_tokens: answer_tokens,
        lease=timedelta(minutes=5),
    )
    request = quota.request(("bob", "four"), {"answer_tokens": 64}, "celery:task-1:2")
    assert (request.subject, request.tier, request.model) == ("bob", "batch", "gpt-4o")
    assert (request.input_tokens, request.max_output_tokens) == (4, 64)
    assert request.lease.ToTimedelta() == timedelta(minutes=5)
    assert request.idempotency_key == "celery:task-1:2"
    assert request.priority == pb.PRIORITY_LOW  # queued work is background work by default


def test_priority_none_leaves_it_to_the_tier() -> None:
    quota = TaskQuota(client=no_client, subject="alice", priority=None)
    assert quota.request((), {}, "key").priority == pb.PRIORITY_UNSPECIFIED
    assert TaskQuota(client=no_client, subject="alice", priority="high").request((), {}, "key").priority == (
        pb.PRIORITY_HIGH
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": "urgent"}, "priority must be one of"),
        ({"max_retries": -1}, "max_retries must be 0 or more"),
        ({"max_countdown": 0}, "max_countdown must be positive"),
        ({"retry_unavailable_after": -1.0}, "retry_unavailable_after must be 0 or more"),
    ],
)
def test_bad_options_are_refused_when_the_task_is_declared(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskQuota(client=no_client, subject="alice", **options)  # type: ignore[arg-type]


def test_task_denied_is_rebuilt_from_its_args_as_a_json_result_backend_does() -> None:
    denied = TaskDenied("quota denied by 'tpm': never fits", "DENY_REASON_EXCEEDS_CAPACITY", "tpm", None)
    rebuilt = TaskDenied(*denied.args)
    assert (rebuilt.reason, rebuilt.binding_limit, rebuilt.retry_after) == (
        "DENY_REASON_EXCEEDS_CAPACITY",
        "tpm",
        None,
    )
    assert str(rebuilt) == "quota denied by 'tpm': never fits"
