"""`quotad.celery` without a worker: what a run asks for, and how `priority` is picked up."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from quotad import SyncQuotaClient, pb
from quotad.celery import TaskDenied, TaskQuota, set_priority


def no_client() -> SyncQuotaClient:
    raise AssertionError("not called here")


def request_with_priority() -> Message:
    """A CheckAndReserveRequest as stubs with the `priority` enum field of issue 5 would make it."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="test/priority.proto",
        package="test",
        syntax="proto3",
        enum_type=[
            descriptor_pb2.EnumDescriptorProto(
                name="Priority",
                value=[
                    descriptor_pb2.EnumValueDescriptorProto(name=name, number=number)
                    for number, name in enumerate(
                        ["PRIORITY_UNSPECIFIED", "PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH"]
                    )
                ],
            )
        ],
        message_type=[
            descriptor_pb2.DescriptorProto(
                name="CheckAndReserveRequest",
                field=[
                    field(name="subject", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL),
                    field(
                        name="priority",
                        number=11,
                        type=field.TYPE_ENUM,
                        type_name=".test.Priority",
                        label=field.LABEL_OPTIONAL,
                    ),
                ],
            )
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("test.CheckAndReserveRequest"))()


def test_priority_is_set_when_the_request_has_the_field() -> None:
    request = request_with_priority()
    assert set_priority(request, "low")
    assert request.priority == 1  # type: ignore[attr-defined]  # PRIORITY_LOW
    assert set_priority(request, "high")
    assert request.priority == 3  # type: ignore[attr-defined]  # PRIORITY_HIGH
    assert not set_priority(request, None)


def test_priority_is_left_out_when_the_stubs_predate_it() -> None:
    request = pb.CheckAndReserveRequest(subject="alice")
    has_priority = "priority" in request.DESCRIPTOR.fields_by_name
    assert set_priority(request, "low") == has_priority


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
