"""Fuzz a running quotad: every QuotaService method, streams included, and a table of the answers.

    python bench/fuzz.py [--address 127.0.0.1:50051] [--cases 20000] [--seed 1] [--in-flight 32]

Each case sends raw bytes (no serializer on the channel) to one method, the methods in
turn: random bytes, a valid request with bytes flipped, inserted, deleted or truncated or
with invalid UTF-8 spliced into a string field, a message built from the real types with
extreme values (huge and negative numbers, unknown enum values, invalid Durations, empty and
huge strings, thousands of repeated items), or the valid request itself. A stream case sends
1 to 8 such items on one stream. The valid requests fit the example policy
(server/quotad_server/examples/policy.yaml: models gpt-4o and gpt-4o-mini, tiers free and
premium); commits and releases name reservations made at start.

It prints the status codes received per method, then the outcomes of batch and stream
items, and exits 1 if any answer was UNKNOWN, INTERNAL or UNAVAILABLE (with Redis up, none
should be). The same --seed sends the same cases. It is a measurement, not a test:
tests/integration/test_fuzz.py is the test.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # what the fuzz test shares with this tool
from tests import fuzzing
from tests.fuzzing import mutated

T = TypeVar("T")

SERVICE, METHODS = fuzzing.SERVICE, fuzzing.METHODS
STREAMS = {method.name for method in SERVICE.methods if method.client_streaming}
MISSING = "ITEMS_UNANSWERED"  # a stream that ended OK without answering every item
BROKEN = {"UNKNOWN", "INTERNAL", "UNAVAILABLE", MISSING}  # never an answer to bad input
COLUMNS = [
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNKNOWN",
    "INTERNAL",
    "UNAVAILABLE",
]
CLASSES: dict[str, type[Message]] = {
    getattr(pb, name).DESCRIPTOR.full_name: getattr(pb, name) for name in pb.DESCRIPTOR.message_types_by_name
} | {"google.protobuf.Duration": duration_pb2.Duration, "google.protobuf.Timestamp": timestamp_pb2.Timestamp}
INTS = [0, 1, -1, 7, 10**9, 10**9 + 1, 2**31 - 1, -(2**31), 2**32, 2**62, 2**63 - 1, -(2**63)]
RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
STRINGS = [
    *("", "alice", "gpt-4o", "gpt-4o-mini", "free", "premium", "acme", "user", "system", "0" * 40),
    *("a\x00b", "line\nbreak", "\u202eevil", "\u00e9" * 129, "<|endoftext|>", "x" * 257),
]
HUGE = [300, 5_000, 300_000, 1_100_000]  # the last is over the default 1 MiB prompt limit
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


# -- bodies -----------------------------------------------------------------------------


def random_text(rng: random.Random, small: bool) -> str:
    """A known, odd, random or (unless `small`) huge string."""
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(STRINGS)
    if roll < 0.97 or small:
        alphabet = [chr(rng.choice((rng.randrange(32, 127), rng.randrange(0xA0, 0xD800)))) for _ in range(8)]
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(41)))
    return "y" * rng.choice(HUGE)


def random_value(field: FieldDescriptor, rng: random.Random, depth: int, small: bool) -> Any:
    """One value for a field: extremes first, anything of its type next."""
    if field.message_type is not None:
        return random_message(field.message_type, rng, depth + 1, small)
    if field.enum_type is not None:
        numbers = [value.number for value in field.enum_type.values]
        return rng.choice([*numbers, -1, max(numbers) + 1, 99, 2**31 - 1, -(2**31)])
    if field.type == FieldDescriptor.TYPE_STRING:
        return random_text(rng, small)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.0, -1.0, 1e300, float("inf"), float("nan")])
    low, high = RANGES[field.type]
    return rng.choice([i for i in INTS if low <= i <= high]) if rng.random() < 0.6 else rng.randint(low, high)


def random_message(
    descriptor: Descriptor, rng: random.Random, depth: int = 0, small: bool = False
) -> Message:
    """A message of the real type with a random subset of its fields set to extreme values."""
    message = CLASSES[descriptor.full_name]()
    if depth > 3:
        return message
    for field in descriptor.fields:
        if rng.random() < 0.5:
            continue
        if field.is_repeated:
            if not small and rng.random() < 0.15:  # one small item thousands of times
                items = [random_value(field, rng, depth, small=True)] * rng.randrange(100, 3000)
            else:
                items = [random_value(field, rng, depth, small) for _ in range(rng.randrange(4))]
            getattr(message, field.name).extend(items)
        elif field.message_type is not None:
            getattr(message, field.name).CopyFrom(random_value(field, rng, depth, small))
        else:
            setattr(message, field.name, random_value(field, rng, depth, small))
    return message


class Rolls:
    """A fuzzing.Chooser on a seeded random.Random: the same run every time for one --seed."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def integer(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return self._rng.choice(options)

    def binary(self, low: int, high: int) -> bytes:
        return self._rng.randbytes(self._rng.randint(low, high))


def fuzzed_body(method: str, seeds: dict[str, list[bytes]], rng: random.Random) -> bytes:
    """One body (or stream item) for `method`, of a random kind."""
    descriptor = SERVICE.methods_by_name[method].input_type
    roll = rng.random()
    if roll < 0.25:
        return rng.randbytes(rng.randrange(257))
    if roll < 0.70:
        return mutated(rng.choice(seeds[method]), descriptor, Rolls(rng))
    if roll < 0.90:
        return random_message(descriptor, rng).SerializeToString()
    return rng.choice(seeds[method])


# -- sending and counting ----------------------------------------------------------------


class Tally:
    """Status codes per method, and the outcomes of batch and stream items."""

    def __init__(self) -> None:
        self.codes: dict[str, Counter[str]] = {method: Counter() for method in METHODS}
        self.items: dict[str, Counter[str]] = {method: Counter() for method in METHODS}
        self.examples: dict[str, str] = {}  # the first details seen for a broken answer

    def answered(self, method: str, code: str, details: str = "") -> None:
        self.codes[method][code] += 1
        if code in BROKEN:
            self.examples.setdefault(f"{method} {code}", details[:300])

    def item(self, method: str, result: Any) -> None:
        if result.WhichOneof("outcome") == "error":
            code = result.error.code
            self.items[method][CODE_NAMES.get(code, f"code {code}")] += 1
            if CODE_NAMES.get(code) in BROKEN:
                self.examples.setdefault(f"{method} item {CODE_NAMES[code]}", result.error.message[:300])
        else:
            self.items[method]["answered"] += 1


async def send(
    channel: grpc.aio.Channel, method: str, bodies: list[bytes], tally: Tally, call_timeout_s: float
) -> None:
    """Send `bodies` as they are (one, or a stream's items) and count the answer and its items."""
    path = f"/{SERVICE.full_name}/{method}"
    parse: Callable[[bytes], Any] = CLASSES[SERVICE.methods_by_name[method].output_type.full_name].FromString
    try:
        if method in STREAMS:
            stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
            answers = [parse(raw) async for raw in stream(iter(bodies), timeout=call_timeout_s)]
            if len(answers) != len(bodies):
                tally.answered(method, MISSING, f"{len(bodies)} items, {len(answers)} answers")
                return
            results = [answer.result for answer in answers]
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            results = list(getattr(parse(await unary(bodies[0], timeout=call_timeout_s)), "results", ()))
    except grpc.aio.AioRpcError as error:
        tally.answered(method, error.code().name, error.details() or "")
        return
    tally.answered(method, "OK")
    for result in results:
        tally.item(method, result)


async def fuzz(address: str, cases: int, seed: int, in_flight: int, call_timeout_s: float) -> Tally:
    """Send `cases` fuzzed calls, `in_flight` at a time, the methods in turn."""
    rng = random.Random(seed)
    tally = Tally()
    async with grpc.aio.insecure_channel(address) as channel:
        seeds = await fuzzing.seeds(pb_grpc.QuotaServiceStub(channel))
        queue: asyncio.Queue[tuple[str, list[bytes]] | None] = asyncio.Queue(in_flight * 2)

        async def worker() -> None:
            while (case := await queue.get()) is not None:
                await send(channel, *case, tally, call_timeout_s)

        workers = [asyncio.create_task(worker()) for _ in range(in_flight)]
        for index in range(cases):
            method = METHODS[index % len(METHODS)]
            count = rng.randint(1, 8) if method in STREAMS else 1
            await queue.put((method, [fuzzed_body(method, seeds, rng) for _ in range(count)]))
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    return tally


def print_table(title: str, rows: dict[str, Counter[str]], columns: list[str]) -> None:
    """One row per method, one column per code seen (`columns` first, in their order)."""
    seen = [c for c in columns if any(row[c] for row in rows.values())]
    seen += sorted({c for row in rows.values() for c in row} - set(seen))
    width = max(len(method) for method in rows)
    print(f"\n{title}")
    print(f"  {'method':<{width}}  " + "  ".join(f"{c:>{max(len(c), 7)}}" for c in [*seen, "total"]))
    for method, row in rows.items():
        if row:
            cells = [*(row[c] for c in seen), sum(row.values())]
            print(
                f"  {method:<{width}}  "
                + "  ".join(f"{n:>{max(len(c), 7)}}" for c, n in zip([*seen, "total"], cells, strict=True))
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default="127.0.0.1:50051", help="a running quotad (default: make run's)")
    parser.add_argument("--cases", type=int, default=20_000, help="calls to make, the methods in turn")
    parser.add_argument("--seed", type=int, default=1, help="the same seed sends the same cases")
    parser.add_argument("--in-flight", type=int, default=32, help="calls at once")
    # Above the example policy's 30 s max_wait: a request that waits in line is not a timeout.
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds per call")
    args = parser.parse_args()

    started = time.perf_counter()
    tally = asyncio.run(fuzz(args.address, args.cases, args.seed, args.in_flight, args.timeout))
    elapsed = time.perf_counter() - started
    print(f"{args.cases:,} cases against {args.address} (seed {args.seed}) in {elapsed:.1f} s")
    print_table("status codes per method", tally.codes, COLUMNS)
    print_table(
        "batch and stream items: answered, or the code of their error", tally.items, ["answered", *COLUMNS]
    )
    broken = sum(row[code] for row in (*tally.codes.values(), *tally.items.values()) for code in BROKEN)
    calls = sum(sum(row.values()) for row in tally.codes.values())
    items = sum(sum(row.values()) for row in tally.items.values())
    print(
        f"\n{broken} UNKNOWN/INTERNAL/UNAVAILABLE out of {calls:,} calls and their {items:,} batch and stream items"
    )
    for where, details in tally.examples.items():
        print(f"  {where}: {details}")
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
