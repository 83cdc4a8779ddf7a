"""Celery integration: reserve quota before a task runs, commit what it used, defer it when denied.

`pip install 'quotad[celery]'`. Make `QuotaTask` the task's base class and describe the call
with `TaskQuota` (the same idiom as Celery's own custom task classes):

    from celery import Celery
    from quotad import SyncQuotaClient
    from quotad.celery import QuotaTask, TaskQuota, report_usage

    app = Celery("llm", broker="redis://localhost:6379/0")

    def quotad_client() -> SyncQuotaClient:       # called once per worker process, lazily
        return SyncQuotaClient("quotad.internal:50051")

    @app.task(base=QuotaTask, quota=TaskQuota(
        client=quotad_client,
        subject=lambda user_id, text: user_id,    # fixed values, or callables of the task's arguments
        model="gpt-4o",
        input_tokens=lambda user_id, text: len(text) // 3,
        max_output_tokens=300,
    ))
    def summarize(user_id: str, text: str) -> str:
        response = openai_client.chat.completions.create(..., max_tokens=300)
        report_usage(response.usage)               # what Commit charges
        return response.choices[0].message.content

What the worker does with each run:

- before the body: `CheckAndReserve`, with an idempotency key made of the task id and its retry
  count, so a redelivered message (a worker that died, `acks_late`) gets its first reservation back
  (`replayed`) instead of reserving twice; at `priority` `PRIORITY_LOW` by default, so that
  queued work gives way to interactive traffic on shared limits.
- allowed: the body runs. When it returns, `Commit` charges what it reported with
  `report_usage(...)`, else what `usage_from_result(result)` reads, else the estimate.
- the body raises: `Release` (or, when it had reported usage, the LLM was called: `Commit` that).
- denied for now (`DENY_REASON_LIMIT_EXCEEDED`, `DENY_REASON_BUDGET_EXHAUSTED`: any denial with a
  `retry_after`): the body does not run; the task is re-scheduled with `self.retry(countdown=retry_after)`, at most `max_retries`
  times and only when `retry_after` is within `max_countdown`. Otherwise it fails with
  `TaskDenied`.
- never fits (`DENY_REASON_EXCEEDS_CAPACITY`): fails at once with `TaskDenied`, not retried.
- quotad unreachable (`Unavailable` after the client's own retries): re-scheduled after
  `retry_unavailable_after` seconds, within the same `max_retries`.

Celery is imported by this module only: `import quotad` never needs it.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, NoReturn, TypeAlias, TypedDict, TypeVar

from quotad._common import Outcome, new_idempotency_key, reserve_request, seconds
from quotad.errors import Unavailable
from quotad.sync import SyncQuotaClient
from quotad.v1 import quota_pb2 as pb

try:
    from celery import Task
    from celery.utils.log import get_task_logger
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError("quotad.celery needs Celery: pip install 'quotad[celery]'") from error

__all__ = ["QuotaTask", "TaskDenied", "TaskQuota", "current_reservation", "report_usage"]

T = TypeVar("T")
FromArgs: TypeAlias = T | Callable[..., T]
"""A fixed value, or a callable that gets the task's arguments (as the body gets them) and returns it."""

Priority = Literal["low", "normal", "high"]
_PRIORITIES: Mapping[str, pb.Priority.ValueType] = {
    "low": pb.PRIORITY_LOW,
    "normal": pb.PRIORITY_NORMAL,
    "high": pb.PRIORITY_HIGH,
}
_MAX_IDEMPOTENCY_KEY_BYTES = 256

logger = get_task_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class TaskQuota:
    """What one run of a task reserves, and what the worker does when it is denied.

    The request fields (`subject`, `tenant`, `tier`, `model`, `input_tokens`,
    `max_output_tokens`, `lease`) are fixed values, or callables that are given the task's
    positional and keyword arguments exactly as the body is (without `self` for bound tasks).

    - `client`: makes the `SyncQuotaClient`. Called once per worker process on first use (never
      at import, so no gRPC channel crosses the prefork pool's fork); reuse one factory for
      many tasks to share one channel.
    - `priority`: `"low"` (default: queued work is background work, the first to stop when a
      shared limit runs short), `"normal"`, `"high"`, or None for the tier's default.
    - `exclude_cached`: leave prompt-cache reads uncharged on Commit (see `quotad.usage`).
    - `usage_from_result`: reads the usage to commit from the body's return value, when the
      body did not call `report_usage`; e.g. `lambda result: result["usage"]`.
    - `max_retries`: how many times a denied (or `Unavailable`) run is re-scheduled before the
      task fails with `TaskDenied` (or `Unavailable`). It counts `request.retries`, which the
      task's own `self.retry` calls also increase. Default 10.
    - `max_countdown`: the longest `retry_after` a task is parked for (seconds or timedelta;
      default 1 hour). A longer one, such as a daily budget spent in the morning, fails the
      task with `TaskDenied` instead: brokers that use a visibility timeout (Redis, SQS;
      default 1 hour) deliver a task that waits longer than it to a second worker. Raise both
      together to park tasks until a budget resets.
    - `retry_unavailable_after`: seconds before a run whose CheckAndReserve found quotad
      unreachable is tried again; None fails the task with `Unavailable` at once.
    """

    client: Callable[[], SyncQuotaClient]
    subject: FromArgs[str]
    tenant: FromArgs[str] = ""
    tier: FromArgs[str] = ""
    model: FromArgs[str] = ""
    input_tokens: FromArgs[int] = 0
    max_output_tokens: FromArgs[int] = 0
    lease: FromArgs[timedelta | None] = None
    priority: Priority | None = "low"
    exclude_cached: bool = False
    usage_from_result: Callable[[Any], object] | None = None
    max_retries: int = 10
    max_countdown: float | timedelta = timedelta(hours=1)
    retry_unavailable_after: float | None = 5.0

    def __post_init__(self) -> None:
        if self.priority is not None and self.priority not in _PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(_PRIORITIES)} or None, got {self.priority!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")
        if seconds(self.max_countdown) <= 0:
            raise ValueError(f"max_countdown must be positive, got {self.max_countdown}")
        if self.retry_unavailable_after is not None and self.retry_unavailable_after < 0:
            raise ValueError(f"retry_unavailable_after must be 0 or more, got {self.retry_unavailable_after}")

    def arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ReserveArguments:
        """The check_and_reserve arguments for one run with these task arguments."""

        def value(source: FromArgs[T]) -> T:
            return source(*args, **kwargs) if callable(source) else source

        return ReserveArguments(
            subject=value(self.subject),
            tenant=value(self.tenant),
            tier=value(self.tier),
            model=value(self.model),
            input_tokens=value(self.input_tokens),
            max_output_tokens=value(self.max_output_tokens),
            lease=value(self.lease),
            priority=pb.PRIORITY_UNSPECIFIED if self.priority is None else _PRIORITIES[self.priority],
        )

    def request(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], idempotency_key: str
    ) -> pb.CheckAndReserveRequest:
        """The CheckAndReserve one run with these arguments sends."""
        return reserve_request(**self.arguments(args, kwargs), idempotency_key=idempotency_key)


class ReserveArguments(TypedDict):
    """What a task's CheckAndReserve asks for, worked out from its arguments."""

    subject: str
    tenant: str
    tier: str
    model: str
    input_tokens: int
    max_output_tokens: int
    lease: timedelta | None
    priority: pb.Priority.ValueType


class TaskDenied(Exception):
    """A task was denied its quota and is not retried: it never fits, or it waited long enough.

    `reason` is the DenyReason name (e.g. "DENY_REASON_EXCEEDS_CAPACITY"), `binding_limit` the
    limit that decided, `retry_after` seconds (None when it never fits). The constructor takes
    exactly its `args`, so the exception survives a JSON result backend.
    """

    def __init__(
        self, message: str, reason: str = "", binding_limit: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message, reason, binding_limit, retry_after)
        self.message = message
        self.reason = reason
        self.binding_limit = binding_limit
        self.retry_after = retry_after

    @classmethod
    def of(cls, response: pb.CheckAndReserveResponse, why: str) -> TaskDenied:
        reason = pb.DenyReason.Name(response.deny_reason)
        retry_after = (
            response.retry_after.ToTimedelta().total_seconds() if _has_retry_after(response) else None
        )
        return cls(
            f"quota denied by {response.binding_limit!r} ({reason}): {why}",
            reason,
            response.binding_limit,
            retry_after,
        )

    def __str__(self) -> str:
        return self.message


@dataclass
class _Held:
    """The reservation of the run in progress, and the usage its body reported."""

    response: pb.CheckAndReserveResponse
    outcome: Outcome = field(default_factory=Outcome)

    def reported(self) -> bool:
        return self.outcome.recorded


_held: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("quotad_celery_held", default=None)


def _current() -> _Held:
    held = _held.get()
    if held is None:
        raise RuntimeError(
            "no quota reservation here: call this from the body of a QuotaTask that has quota=TaskQuota(...)"
        )
    return held


def report_usage(
    usage: object | None = None, *, input_tokens: int | None = None, output_tokens: int | None = None
) -> None:
    """From the task body: what the LLM call used, to commit when the body ends.

    An OpenAI (Chat Completions or Responses) or Anthropic `usage` object, a whole response that
    has `.usage`, a mapping of the same (see `quotad.usage`), or `input_tokens=` and
    `output_tokens=`. Called again, the last report wins; for a stream, report every event or
    chunk as it arrives, as with a reservation's `record()` (an Anthropic `message_delta`
    updates its `message_start`). A body that reported usage and then raised is committed with
    it, not released: the tokens were spent.
    """
    if usage is None and (input_tokens is None or output_tokens is None):
        raise TypeError("report_usage needs a usage object, or both input_tokens and output_tokens")
    _current().outcome.record(usage, input_tokens, output_tokens)


def current_reservation() -> pb.CheckAndReserveResponse:
    """From the task body: the reservation it runs under (`reservation_id`, `reserved`, `replayed`, ...)."""
    return _current().response


_clients: dict[Callable[[], SyncQuotaClient], tuple[int, SyncQuotaClient]] = {}
_clients_lock = threading.Lock()


def _client(factory: Callable[[], SyncQuotaClient]) -> SyncQuotaClient:
    """One client per factory and process: a pool child made by fork opens its own channel."""
    with _clients_lock:
        cached = _clients.get(factory)
        if cached is None or cached[0] != os.getpid():
            cached = (os.getpid(), factory())
            _clients[factory] = cached
        return cached[1]


def _has_retry_after(response: pb.CheckAndReserveResponse) -> bool:
    return response.HasField("retry_after")


class QuotaTask(Task[..., Any]):
    """A Celery task class that runs its body only under a quotad reservation.

    `@app.task(base=QuotaTask, quota=TaskQuota(...))`; see `TaskQuota` and this module's
    docstring. Without `quota` (e.g. as the app's `task_cls`), a task runs as a plain one.
    """

    quota: TaskQuota | None = None
    # A denial is an answer, not an error: the worker logs a TaskDenied failure without a traceback.
    throws = (TaskDenied,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spec = self.quota
        if spec is None:
            return super().__call__(*args, **kwargs)
        client = _client(spec.client)
        held = _Held(self._reserve(client, spec, args, kwargs))
        token = _held.set(held)
        try:
            result = super().__call__(*args, **kwargs)
        except BaseException as error:
            _held.reset(token)
            self._settle_after_failure(client, spec, held, error)
            raise
        _held.reset(token)
        if not held.reported() and spec.usage_from_result is not None:
            try:
                held.outcome.record(spec.usage_from_result(result), None, None)
            except Exception:  # the work is done: commit the estimate rather than fail the task
                logger.exception("quotad: usage_from_result could not read the usage of %s", self.name)
        self._commit(client, spec, held)
        return result

    def _idempotency_key(self) -> str:
        """Task id + retry count: the same for a redelivered message, new for each retry."""
        request = self.request
        if request.id is None or request.called_directly:
            return new_idempotency_key()
        key = f"celery:{request.id}:{request.retries}"
        if len(key.encode()) > _MAX_IDEMPOTENCY_KEY_BYTES:  # task ids are free-form when callers choose them
            key = "celery-sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return key

    def _reserve(
        self, client: SyncQuotaClient, spec: TaskQuota, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> pb.CheckAndReserveResponse:
        try:
            response = client.check_and_reserve(
                **spec.arguments(args, kwargs), idempotency_key=self._idempotency_key()
            )
        except Unavailable as error:
            if spec.retry_unavailable_after is None or self.request.retries >= spec.max_retries:
                raise
            self._retry(error, spec.retry_unavailable_after)
        if response.decision != pb.DECISION_ALLOWED:
            self._defer(spec, response)
        return response

    def _defer(self, spec: TaskQuota, response: pb.CheckAndReserveResponse) -> NoReturn:
        """Re-schedule a denied run after its retry_after, or fail it with TaskDenied."""
        # Every denial with a retry_after ends (a limit refills, a calendar budget resets, a line
        # empties); EXCEEDS_CAPACITY has none.
        if response.deny_reason == pb.DENY_REASON_EXCEEDS_CAPACITY or not _has_retry_after(response):
            raise TaskDenied.of(response, "never fits, not retried")
        wait_s = max(response.retry_after.ToTimedelta().total_seconds(), 0.001)
        if wait_s > seconds(spec.max_countdown):
            limit_s = seconds(spec.max_countdown)
            raise TaskDenied.of(response, f"retry_after {wait_s:g}s is beyond max_countdown {limit_s:g}s")
        if self.request.retries >= spec.max_retries:
            raise TaskDenied.of(response, f"still denied after {self.request.retries} retries")
        self._retry(TaskDenied.of(response, f"retry after {wait_s:g}s"), wait_s)

    def _retry(self, error: Exception, countdown: float) -> NoReturn:
        try:
            # Bounded by TaskQuota.max_retries above; Celery's own bound must not cut in first.
            raise self.retry(exc=error, countdown=countdown, max_retries=self.request.retries + 1)
        finally:
            # retry(max_retries=...) leaves this on the task instance, where autoretry_for would
            # later take it for the task's own bound.
            vars(self).pop("override_max_retries", None)

    def _commit(self, client: SyncQuotaClient, spec: TaskQuota, held: _Held) -> None:
        try:
            client.commit(
                held.response.reservation_id,
                held.outcome.commit_usage(held.response.reserved),
                exclude_cached=spec.exclude_cached,
            )
        except Exception:
            # The work is done and its result matters more: failing the task now would run (and
            # pay for) it again. The estimate stays charged; the lease frees the slot.
            logger.exception("quotad: commit of reservation %s failed", held.response.reservation_id)

    def _settle_after_failure(
        self, client: SyncQuotaClient, spec: TaskQuota, held: _Held, error: BaseException
    ) -> None:
        if held.reported():  # the LLM was called before the body failed: its tokens were spent
            self._commit(client, spec, held)
            return
        try:
            client.release(held.response.reservation_id)
        except Exception as release_error:  # the body's exception matters more; the lease frees the slot
            error.add_note(
                f"quotad: releasing reservation {held.response.reservation_id} failed: {release_error}"
            )
