"""Fuzzing quotad's wire: what the fuzz test (tests/integration/test_fuzz.py) and the measuring
tool (bench/fuzz.py) share. The test draws its choices from hypothesis, the tool from a seeded
random.Random; both make them through a `Chooser`, so a mutation is the same code in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc

T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["QuotaService"]
METHODS = [method.name for method in SERVICE.methods]
MUTATIONS = ("flip", "insert", "delete", "truncate", "varint", "bad-utf8")


class Chooser(Protocol):
    """Where a mutation's choices come from."""

    def integer(self, low: int, high: int) -> int:
        """A whole number from `low` to `high`, both included."""
        ...

    def choice(self, options: Sequence[T]) -> T: ...

    def binary(self, low: int, high: int) -> bytes:
        """Between `low` and `high` bytes."""
        ...


def varint(value: int) -> bytes:
    """The protobuf varint encoding of a non-negative `value`."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            return bytes(out) + bytes([byte])
        out.append(byte | 0x80)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field `number` holding `payload` (a string, bytes or a sub-message) on the wire."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def bad_utf8_field(descriptor: Descriptor, depth: int = 0) -> bytes:
    """Bytes that add a string field holding invalid UTF-8, at the top or inside a sub-message
    (b"" if the message has no string field within three levels)."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return length_delimited(field.number, b"ok\xff\xfe\xc3")
    for field in descriptor.fields:
        if field.message_type is not None and depth < 3:
            inner = bad_utf8_field(field.message_type, depth + 1)
            if inner:
                return length_delimited(field.number, inner)
    return b""


def mutated(seed: bytes, descriptor: Descriptor, choose: Chooser) -> bytes:
    """A valid body with a few bytes flipped, inserted, deleted or truncated, an over-long
    varint or a bad string spliced in."""
    body = bytearray(seed)
    for _ in range(choose.integer(1, 4)):
        kind = choose.choice(MUTATIONS)
        at = choose.integer(0, len(body))
        if kind == "flip" and body:
            body[min(at, len(body) - 1)] ^= 1 << choose.integer(0, 7)
        elif kind == "insert":
            body[at:at] = choose.binary(1, 8)
        elif kind == "delete":
            del body[at : at + choose.integer(1, 8)]
        elif kind == "truncate":
            del body[at:]
        elif kind == "varint":  # where a tag or a length should be
            body[at:at] = b"\xff" * 10 + b"\x01"
        elif kind == "bad-utf8":
            body += bad_utf8_field(descriptor)
    return bytes(body)


def reserve_requests() -> list[pb.CheckAndReserveRequest]:
    """Valid CheckAndReserve requests of every shape: numbers, every field, chat, a prompt.
    They name what both the fuzz test's policy and the example policy have (gpt-4o,
    gpt-4o-mini, the premium tier)."""
    good = pb.CheckAndReserveRequest(subject="alice", model="gpt-4o", input_tokens=10, max_output_tokens=20)
    every_field = pb.CheckAndReserveRequest(
        subject="bob",
        tenant="acme",
        tier="premium",
        model="gpt-4o",
        input_tokens=100,
        max_output_tokens=50,
        idempotency_key="key-1",
        priority=pb.PRIORITY_LOW,
    )
    every_field.lease.FromSeconds(5)
    every_field.max_wait.FromMilliseconds(20)
    chat = pb.CheckAndReserveRequest(
        subject="carol",
        model="gpt-4o-mini",
        max_output_tokens=64,
        messages=[
            pb.ChatMessage(role="system", content="Be brief."),
            pb.ChatMessage(role="user", content="Hi"),
        ],
    )
    prompt = pb.CheckAndReserveRequest(
        subject="dave", model="gpt-4o", prompt="Hello, world.", max_output_tokens=8
    )
    return [good, every_field, chat, prompt]


async def seeds(stub: pb_grpc.QuotaServiceAsyncStub) -> dict[str, list[bytes]]:
    """Valid serialized requests of every method, to mutate; commits and releases name
    reservations just made (and one id of the right shape that was never issued)."""
    reserves = reserve_requests()
    ids = []
    for index in range(12):
        request = pb.CheckAndReserveRequest(subject=f"seed-{index}", model="gpt-4o", input_tokens=5)
        ids.append((await stub.CheckAndReserve(request, timeout=10)).reservation_id)
    commits = [
        pb.CommitRequest(reservation_id=ids[0], input_tokens=5, output_tokens=3, cached_input_tokens=1),
        pb.CommitRequest(reservation_id=ids[1], input_tokens=7),
        pb.CommitRequest(reservation_id=ids[2][:8] + "0" * 32, output_tokens=1),
    ]
    items: dict[str, list[Message]] = {
        "CheckAndReserve": list(reserves),
        "Commit": list(commits),
        "Release": [pb.ReleaseRequest(reservation_id=ids[3]), pb.ReleaseRequest(reservation_id=ids[0])],
        "GetUsage": [
            pb.GetUsageRequest(subject="alice", model="gpt-4o"),
            pb.GetUsageRequest(subject="bob", tenant="acme", tier="premium"),
        ],
        "GetAccuracy": [
            pb.GetAccuracyRequest(model="gpt-4o-mini"),
            pb.GetAccuracyRequest(model="gpt-4o", tier="free"),
        ],
        "CheckAndReserveBatch": [pb.CheckAndReserveBatchRequest(requests=reserves)],
        "CommitBatch": [pb.CommitBatchRequest(requests=[*commits, pb.CommitRequest(reservation_id=ids[4])])],
        "CheckAndReserveStream": [
            pb.CheckAndReserveStreamRequest(request_id=f"r{i}", request=r) for i, r in enumerate(reserves)
        ],
        "CommitStream": [
            pb.CommitStreamRequest(request_id=f"c{i}", request=c)
            for i, c in enumerate([*commits, pb.CommitRequest(reservation_id=ids[5], input_tokens=1)])
        ],
    }
    missing = set(METHODS) - set(items)
    if missing:
        raise AssertionError(f"no valid requests for {sorted(missing)}: add them to tests/fuzzing.py")
    return {method: [m.SerializeToString() for m in messages] for method, messages in items.items()}
