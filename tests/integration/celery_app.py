"""The Celery app that `test_celery.py` runs in a real worker: `celery -A tests.integration.celery_app worker`.

Celery reads the broker and the result backend from CELERY_BROKER_URL and CELERY_RESULT_BACKEND;
the tasks' quotad client reads QUOTAD_ADDR when a worker first needs it. Every task returns what
the test asserts on, JSON only.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from quotad import SyncQuotaClient, pb
from quotad.celery import QuotaTask, TaskQuota, current_reservation, report_usage

app = Celery("quotad-celery-test")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_extended=True,  # results carry `retries`
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


def quotad_client() -> SyncQuotaClient:
    return SyncQuotaClient(os.environ["QUOTAD_ADDR"], timeout=5)


def unreachable_quotad() -> SyncQuotaClient:
    """Nothing listens on port 1: every call is UNAVAILABLE at once."""
    return SyncQuotaClient("127.0.0.1:1", timeout=1, retries=0)


def subject(subject: str, *_: object, **__: object) -> str:
    return subject


def reservation() -> dict[str, Any]:
    held = current_reservation()
    return {
        "reservation_id": held.reservation_id,
        "replayed": held.replayed,
        "priority": pb.Priority.Name(held.priority),  # as the server decided it
    }


BATCH = TaskQuota(
    client=quotad_client,
    subject=subject,
    model="gpt-4o",
    input_tokens=lambda _subject, estimate, *_: estimate["input"],
    max_output_tokens=lambda _subject, estimate, *_: estimate["output"],
    max_retries=3,
)


@app.task
def ping() -> str:
    return "pong"


@app.task(bind=True, base=QuotaTask, quota=BATCH)
def summarize(
    self: QuotaTask, subject: str, estimate: dict[str, int], used: dict[str, int]
) -> dict[str, Any]:
    """Reports OpenAI Chat Completions usage, as `response.usage` would carry it."""
    report_usage({"prompt_tokens": used["input"], "completion_tokens": used["output"]})
    return {"retries": self.request.retries, **reservation()}


@app.task(base=QuotaTask, quota=BATCH)
def fail(subject: str, estimate: dict[str, int], used: dict[str, int] | None) -> None:
    """Raises; with `used`, after reporting that usage (the LLM call had happened)."""
    if used is not None:
        report_usage(input_tokens=used["input"], output_tokens=used["output"])
    raise RuntimeError("the LLM call failed")


@app.task(
    base=QuotaTask,
    quota=TaskQuota(
        client=quotad_client,
        subject=subject,
        model="gpt-4o",
        input_tokens=lambda _subject, estimate: estimate["input"],
        max_output_tokens=lambda _subject, estimate: estimate.get("output", 100),
        usage_from_result=lambda result: result["usage"],
        max_countdown=0.2,
    ),
)
def impatient(subject: str, estimate: dict[str, int]) -> dict[str, Any]:
    """Returns an Anthropic-shaped usage; parks for no longer than 0.2 s."""
    return {"usage": {"input_tokens": 40, "output_tokens": 2}}


@app.task(
    base=QuotaTask,
    quota=TaskQuota(client=unreachable_quotad, subject=subject, max_retries=2, retry_unavailable_after=0.05),
)
def unreachable(subject: str) -> None:
    raise AssertionError("must not run without a reservation")
