"""`quotad.celery` with a real Celery worker on a real broker, against a live quotad.

One Valkey server of this module's own holds quotad's state (db 0), the broker's queues (db 1)
and the task results (db 2). quotad runs in the test's event loop; the worker is a subprocess,
`celery -A tests.integration.celery_app worker --pool=solo`. Blocking Celery calls run in a
thread, so the loop keeps serving the worker's quotad calls. Each test has its own subject, so
the tests share one worker and one quotad without touching each other's counters.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.canvas import Signature
from celery.result import AsyncResult
from quotad import pb
from quotad.celery import TaskDenied
from quotad_server.store.embedded import EmbeddedRedis

from tests.conftest import Quotad, running_quotad
from tests.integration import celery_app
from tests.integration.celery_app import fail, impatient, ping, summarize, unreachable

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gpt-4o"
POLICY = """
    defaults: {tier: batch}
    leases: {default: 30s, min: 1s, max: 10m}
    models: {gpt-4o: {}}
    tiers:
      batch:
        limits:
          - {name: one-per-second, metric: requests, limit: 1, period: 1s, algorithm: sliding_window}
          - {name: tokens-per-day, metric: total_tokens, limit: 10000, period: 1d, algorithm: sliding_window}
          - {name: in-flight, metric: concurrent, limit: 2}
"""
NOTHING_CHARGED = {"one-per-second": 1, "tokens-per-day": 10000, "in-flight": 2}


@dataclass(frozen=True)
class Outcome:
    """A finished task as the result backend recorded it."""

    state: str
    value: Any  # the return value, or the exception
    retries: int


@pytest.fixture(scope="module")
def celery_redis() -> Iterator[EmbeddedRedis]:
    """A server of its own: other tests FLUSHALL theirs, which would empty a running broker."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
async def celery_quotad(celery_redis: EmbeddedRedis) -> AsyncIterator[Quotad]:
    async with running_quotad(POLICY, celery_redis.url) as q:
        yield q


@pytest.fixture(scope="module")
def worker(
    celery_redis: EmbeddedRedis, celery_quotad: Quotad, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """A real worker process, answering once it has run a task."""
    broker = f"redis://127.0.0.1:{celery_redis.port}/1"
    backend = f"redis://127.0.0.1:{celery_redis.port}/2"
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker,
        "CELERY_RESULT_BACKEND": backend,
        "QUOTAD_ADDR": f"127.0.0.1:{celery_quotad.port}",
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable, "-m", "celery", "-A", "tests.integration.celery_app", "worker",
        "--pool=solo", "--loglevel=INFO", "--hostname=quotad-test@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    celery_app.app.conf.update(broker_url=broker, result_backend=backend)
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        try:
            assert ping.delay().get(timeout=60) == "pong"
        except Exception:
            pytest.fail(f"the Celery worker did not answer:\n{log.read_text()[-4000:]}")
        yield
    finally:
        process.terminate()  # warm shutdown
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        celery_app.app.close()


async def run(signature: Signature[Any], *, task_id: str | None = None) -> Outcome:
    """Send a task to the worker and wait, in a thread, until it succeeds or fails for good."""

    def send_and_wait() -> Outcome:
        result: AsyncResult[Any] = signature.apply_async(task_id=task_id)
        result.get(timeout=30, propagate=False)  # RETRY is not final: this waits through retries
        return Outcome(result.state, result.result, result.retries or 0)

    return await asyncio.to_thread(send_and_wait)


def new_subject() -> str:
    return f"celery-{uuid.uuid4().hex[:12]}"


async def usage(q: Quotad, subject: str) -> dict[str, int]:
    return await q.usage(subject=subject, model=MODEL)


async def take_the_one_request_per_second(q: Quotad, subject: str) -> None:
    """Charge the subject's one request of this second (and no tokens): a task for it is denied ~1 s."""
    taken = await q.reserve(subject=subject, model=MODEL, max_output_tokens=1)
    assert taken.decision == pb.DECISION_ALLOWED
    await q.commit(taken.reservation_id, input_tokens=0, output_tokens=0)


@pytest.mark.usefixtures("worker")
async def test_a_denied_task_is_rerun_after_retry_after_and_commits_what_it_reported(
    celery_quotad: Quotad,
) -> None:
    subject = new_subject()
    taken_at = time.monotonic()
    await take_the_one_request_per_second(celery_quotad, subject)

    outcome = await run(summarize.s(subject, {"input": 200, "output": 100}, {"input": 120, "output": 30}))

    assert outcome.state == "SUCCESS", outcome.value
    assert time.monotonic() - taken_at >= 1.0  # it could not be admitted within the 1 s window ...
    assert outcome.value["retries"] == 1  # ... and was re-run once, after retry_after, not polled
    assert outcome.value["replayed"] is False
    assert outcome.value["priority"] == "PRIORITY_LOW"  # the default for queued work, as quotad decided it
    after = await usage(celery_quotad, subject)
    assert after["tokens-per-day"] == 10000 - 150  # exactly the 120 + 30 it reported, not the 300 estimated
    assert after["in-flight"] == 2  # committed: its slot is free


@pytest.mark.usefixtures("worker")
async def test_a_task_that_never_fits_fails_at_once_and_reserves_nothing(celery_quotad: Quotad) -> None:
    subject = new_subject()
    started = time.monotonic()

    outcome = await run(summarize.s(subject, {"input": 20000, "output": 0}, {"input": 1, "output": 1}))

    assert outcome.state == "FAILURE"
    assert isinstance(outcome.value, TaskDenied), outcome.value
    assert outcome.value.reason == "DENY_REASON_EXCEEDS_CAPACITY"
    assert outcome.value.binding_limit == "tokens-per-day"
    assert outcome.value.retry_after is None
    assert "never fits" in str(outcome.value)
    assert outcome.retries == 0
    assert time.monotonic() - started < 5
    assert await usage(celery_quotad, subject) == NOTHING_CHARGED


@pytest.mark.usefixtures("worker")
async def test_a_task_whose_body_raises_releases_its_reservation(celery_quotad: Quotad) -> None:
    subject = new_subject()

    outcome = await run(fail.s(subject, {"input": 300, "output": 100}, None))

    assert outcome.state == "FAILURE"
    assert isinstance(outcome.value, RuntimeError)
    assert str(outcome.value) == "the LLM call failed"
    assert outcome.retries == 0
    assert await usage(celery_quotad, subject) == NOTHING_CHARGED  # request, tokens and slot given back


@pytest.mark.usefixtures("worker")
async def test_a_body_that_reported_usage_then_raised_is_committed_not_released(
    celery_quotad: Quotad,
) -> None:
    subject = new_subject()

    outcome = await run(fail.s(subject, {"input": 300, "output": 100}, {"input": 300, "output": 7}))

    assert outcome.state == "FAILURE"
    after = await usage(celery_quotad, subject)
    assert after["tokens-per-day"] == 10000 - 307  # the tokens the LLM call spent stay charged
    assert after["in-flight"] == 2


@pytest.mark.usefixtures("worker")
async def test_a_redelivered_task_gets_its_first_reservation_back(celery_quotad: Quotad) -> None:
    subject = new_subject()
    task_id = str(uuid.uuid4())
    task = summarize.s(subject, {"input": 200, "output": 100}, {"input": 120, "output": 30})

    first = await run(task, task_id=task_id)
    await asyncio.to_thread(AsyncResult(task_id, app=celery_app.app).forget)
    # The same message again (same task id, same retry count), as a broker redelivers it when a
    # worker dies before acknowledging: within the same second, a new reservation would be denied.
    again = await run(task, task_id=task_id)

    assert first.state == again.state == "SUCCESS"
    assert first.value["replayed"] is False
    assert again.value["replayed"] is True
    assert again.value["reservation_id"] == first.value["reservation_id"]
    assert again.value["retries"] == 0
    assert (await usage(celery_quotad, subject))["tokens-per-day"] == 10000 - 150  # charged once


@pytest.mark.usefixtures("worker")
async def test_the_usage_is_read_from_the_result_and_long_waits_are_not_parked(
    celery_quotad: Quotad,
) -> None:
    admitted_subject, denied_subject = new_subject(), new_subject()

    admitted = await run(impatient.s(admitted_subject, {"input": 500}))
    assert admitted.state == "SUCCESS"
    after = await usage(celery_quotad, admitted_subject)
    assert after["tokens-per-day"] == 10000 - 42  # the Anthropic-shaped 40 in + 2 out it returned

    await take_the_one_request_per_second(celery_quotad, denied_subject)
    parked = await run(impatient.s(denied_subject, {"input": 500}))
    assert parked.state == "FAILURE"
    assert isinstance(parked.value, TaskDenied), parked.value
    assert parked.value.reason == "DENY_REASON_LIMIT_EXCEEDED"
    assert parked.value.binding_limit == "one-per-second"
    assert parked.value.retry_after is not None
    assert parked.value.retry_after > 0.2
    assert "beyond max_countdown" in str(parked.value)
    assert parked.retries == 0


@pytest.mark.usefixtures("worker")
async def test_an_unreachable_quotad_is_retried_then_fails(celery_quotad: Quotad) -> None:
    outcome = await run(unreachable.s(new_subject()))

    assert outcome.state == "FAILURE"
    assert "UNAVAILABLE" in str(outcome.value)
    assert outcome.retries == 2  # max_retries


async def test_a_task_called_directly_reserves_and_raises_task_denied(
    celery_quotad: Quotad, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker, no broker: `summarize(...)` runs the body in this process under a reservation."""
    monkeypatch.setenv("QUOTAD_ADDR", f"127.0.0.1:{celery_quotad.port}")
    subject = new_subject()
    estimate, used = {"input": 200, "output": 100}, {"input": 50, "output": 5}

    ran = await asyncio.to_thread(summarize, subject, estimate, used)
    with pytest.raises(TaskDenied, match="one-per-second") as denied:
        await asyncio.to_thread(summarize, subject, estimate, used)  # within the same second

    assert ran["retries"] == 0
    assert denied.value.reason == "DENY_REASON_LIMIT_EXCEEDED"
    after = await usage(celery_quotad, subject)
    assert (after["tokens-per-day"], after["in-flight"]) == (10000 - 55, 2)


def readme_example() -> str:
    """The first Python block of the Celery section of the client's README."""
    readme = (ROOT / "clients" / "python" / "README.md").read_text()
    section = readme.split("\n## Celery\n", 1)[1]
    blocks: list[str] = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return blocks[0]


async def test_the_readme_example_runs(
    celery_redis: EmbeddedRedis, celery_quotad: Quotad, tmp_path: Path
) -> None:
    """`tasks.py` from the README, its worker command as written (prefork pool), then `python tasks.py`."""
    (tmp_path / "tasks.py").write_text(readme_example())
    env = {
        **os.environ,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{celery_redis.port}/3",
        "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:{celery_redis.port}/4",
        "QUOTAD_ADDR": f"127.0.0.1:{celery_quotad.port}",
    }
    log = tmp_path / "worker.log"
    with log.open("w") as output:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO", "--concurrency=1",
            cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        example = await asyncio.create_subprocess_exec(
            sys.executable, "tasks.py", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        printed, _ = await asyncio.wait_for(example.communicate(), timeout=90)
    finally:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), timeout=30)
    assert example.returncode == 0, printed.decode() + log.read_text()
    assert printed.decode().strip() == "a summary of 1200 characters"
    after = await usage(celery_quotad, "user-42")
    assert after["tokens-per-day"] == 10000 - 397  # the 300 + 97 it reported
    assert after["in-flight"] == 2


def test_importing_quotad_does_not_import_celery() -> None:
    check = "import sys, quotad; assert 'celery' not in sys.modules, 'quotad imported celery'"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)
