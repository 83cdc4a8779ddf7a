"""Fuzzed bodies on every QuotaService method, streams included, over a real channel to a real quotad.

Whatever the bytes, quotad answers OK, INVALID_ARGUMENT, NOT_FOUND or FAILED_PRECONDITION
(RESOURCE_EXHAUSTED only for a body over grpc's 4 MB receive limit); never UNKNOWN or
INTERNAL, nor UNAVAILABLE with Redis up. A stream answers every item, each error item with one
of the same codes. Error statuses stay within what a client with default limits accepts. The
server keeps serving and its memory stays bounded.

Bodies are sent as raw bytes (no serializer on the channel): random bytes, valid requests of
each method with bytes flipped, inserted, deleted or truncated, invalid UTF-8 spliced into a
string field, and messages built from the real types with extreme values (huge and negative
numbers, unknown enum values, invalid Durations, empty and huge strings, thousands of repeated
items). Hypothesis is derandomized, keeps no database and writes its files to a temporary
directory: the same cases run every time.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from quotad.v1 import quota_pb2 as pb
from quotad_server.store.embedded import EmbeddedRedis

from tests.conftest import Quotad, running_quotad
from tests.fuzzing import METHODS, SERVICE, mutated, seeds

POLICY = """
    defaults: {tier: free}
    leases: {default: 30s, min: 1s, max: 10m}
    waiting: {max_wait: 100ms, heartbeat: 50ms, max_line: 4}
    admission: {low: 0.5, normal: 0.8}
    models:
      gpt-4o: {price: {input: 2.5, output: 10, cached_input: 1.25}}
      gpt-4o-mini: {output_estimate: learned, learned_min_samples: 1}
      custom-llm: {}
    tiers:
      free:
        limits:
          - {name: rpm, metric: requests, limit: 600, period: 1m, algorithm: sliding_window}
          - {name: tpm, metric: total_tokens, limit: 200000, period: 1m}
          - {name: in-flight, metric: concurrent, limit: 20}
      premium:
        priority: high
        limits:
          - {name: daily-spend, metric: cost_usd, limit: 5, period: day}
          - {name: monthly-input, metric: input_tokens, limit: 10000000, period: month, exclude_cached: true}
    tenants:
      "*":
        limits:
          - {name: tenant-tpm, metric: total_tokens, limit: 2000000, period: 1m}
    global:
      limits:
        - {name: gpt-4o-rpm, metric: requests, limit: 100000, period: 1m, model: gpt-4o}
"""
# Hypothesis caches what it finds in the code under .hypothesis/ in the working directory, from
# test collection on (its pytest plugin): keep that out of the checkout, in one temporary place.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "quotad-hypothesis")
STREAMS = [method.name for method in SERVICE.methods if method.client_streaming]
T = TypeVar("T")
RPC_TIMEOUT_S = 30.0  # generous: a loaded machine must never turn into a failure
MAX_RECEIVE_BYTES = 4 * 1024 * 1024  # grpc's default: a bigger body is RESOURCE_EXHAUSTED
ANSWERS = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}
ITEM_ERRORS = {grpc.StatusCode[name].value[0] for name in ANSWERS - {"OK"}}  # a batch or stream item's
# Within gRPC's default soft limit on received metadata (8 KB), with room for the framing.
MAX_TRAILER_BYTES = 7 * 1024
RSS_GROWTH_BOUND = 256 * 1024 * 1024  # generous (~70 MiB seen): a bloat or a leak, not allocator noise
FUZZ = settings(
    deadline=None,  # a slow machine must not fail a case
    derandomize=True,  # the same cases every run
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
_MESSAGE_CLASSES: dict[str, type[Message]] = {
    getattr(pb, name).DESCRIPTOR.full_name: getattr(pb, name) for name in pb.DESCRIPTOR.message_types_by_name
} | {
    "google.protobuf.Duration": duration_pb2.Duration,
    "google.protobuf.Timestamp": timestamp_pb2.Timestamp,
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(repr=False)  # Hypothesis prints the fixture with a failing case: keep that short
class Fuzzed:
    """The quotad under fuzz, a raw channel to it, and valid requests of each method to mutate."""

    quotad: Quotad
    channel: grpc.aio.Channel
    rss_at_start: int
    seeds: dict[str, list[bytes]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Fuzzed(port={self.quotad.port})"


@pytest.fixture(scope="module")
async def fuzzed(redis_server: EmbeddedRedis) -> AsyncIterator[Fuzzed]:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    # A generous store timeout: on a loaded machine a 1000-item batch must not become UNAVAILABLE.
    async with running_quotad(POLICY, redis_server.url, timeout_s=10.0) as quotad:
        fuzz = Fuzzed(quotad, quotad.channel, 0, await seeds(quotad.stub))
        for method, bodies in fuzz.seeds.items():  # warm every path before the baseline
            await _send(fuzz, method, bodies if method in STREAMS else bodies[:1])
        gc.collect()
        fuzz.rss_at_start = _rss_bytes()
        yield fuzz


# -- sending --------------------------------------------------------------------------


async def _send(fuzz: Fuzzed, method: str, bodies: list[bytes]) -> None:
    """Send `bodies` (one, or a stream's items) as they are, and check the answer."""
    path = f"/{SERVICE.full_name}/{method}"
    parse: Callable[[bytes], Any] = _MESSAGE_CLASSES[
        SERVICE.methods_by_name[method].output_type.full_name
    ].FromString
    if method in STREAMS:
        stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = fuzz.channel.stream_stream(path)
        try:
            answers = [parse(raw) async for raw in stream(iter(bodies), timeout=RPC_TIMEOUT_S)]
        except grpc.aio.AioRpcError as error:
            _check_status(error, sum(map(len, bodies)))
            return
        assert len(answers) == len(bodies), f"{len(bodies)} items, {len(answers)} answers"
        _check_results([answer.result for answer in answers])
        return
    (body,) = bodies
    try:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = fuzz.channel.unary_unary(path)
        raw = await unary(body, timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        _check_status(error, len(body))
        return
    _check_results(getattr(parse(raw), "results", ()))  # a batch's items: each an answer too


def _check_results(results: Any) -> None:
    for result in results:
        if result.WhichOneof("outcome") == "error":
            assert result.error.code in ITEM_ERRORS, result.error
            assert len(result.error.message.encode()) <= 1024
            assert len(result.error.field_violations) <= 21


def _check_status(error: grpc.aio.AioRpcError, body_bytes: int) -> None:
    code = error.code().name
    if code == "RESOURCE_EXHAUSTED":
        assert body_bytes > MAX_RECEIVE_BYTES, f"RESOURCE_EXHAUSTED for {body_bytes} bytes: {error.details()}"
        return
    assert code in ANSWERS, f"{code}: {error.details()}"
    trailers = sum(len(key) + len(value) for key, value in error.trailing_metadata() or ())
    message = len((error.details() or "").encode())
    assert message + trailers <= MAX_TRAILER_BYTES, (message, trailers)


# -- strategies -----------------------------------------------------------------------

_INTS = [0, 1, -1, 7, 10**9, 10**9 + 1, 2**31 - 1, -(2**31), 2**32, 2**62, 2**63 - 1, -(2**63)]
_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
_STRINGS = [
    "",
    "alice",
    "gpt-4o",
    "gpt-4o-mini",
    "custom-llm",
    "free",
    "premium",
    "acme",
    "user",
    "system",
    "a\x00b",
    "line\nbreak",
    "\u202eevil",
    "\u00e9" * 129,  # 258 bytes
    "<|endoftext|>",
    "x" * 257,
    "0" * 40,
]
_HUGE = [300, 5_000, 300_000, 1_100_000]  # the last is over the default 1 MiB prompt limit


def _text(small: bool) -> st.SearchStrategy[str]:
    choices = [st.sampled_from(_STRINGS), st.text(st.characters(codec="utf-8"), max_size=40)]
    if not small:
        choices.append(st.sampled_from(_HUGE).map(lambda n: "y" * n))
    return st.one_of(*choices)


def _one(field: FieldDescriptor, depth: int, small: bool) -> st.SearchStrategy[Any]:
    """One value for a field: extremes first, anything of its type next."""
    if field.message_type is not None:
        return _messages(field.message_type, depth + 1, small)
    if field.enum_type is not None:
        numbers = [value.number for value in field.enum_type.values]
        return st.sampled_from([*numbers, -1, max(numbers) + 1, 99, 2**31 - 1, -(2**31)])
    if field.type == FieldDescriptor.TYPE_STRING:
        return _text(small)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if field.type == FieldDescriptor.TYPE_FLOAT else 64)
    low, high = _RANGES[field.type]
    return st.one_of(st.sampled_from([i for i in _INTS if low <= i <= high]), st.integers(low, high))


def _values(field: FieldDescriptor, depth: int, small: bool) -> st.SearchStrategy[Any]:
    if not field.is_repeated:
        return _one(field, depth, small)
    if small:
        return st.lists(_one(field, depth, small), max_size=2)
    # Or one small item thousands of times: many violations, a big batch, a long chat.
    many = st.tuples(_one(field, depth, small=True), st.integers(100, 3000)).map(lambda p: [p[0]] * p[1])
    return st.one_of(st.lists(_one(field, depth, small), max_size=3), many)


def _messages(descriptor: Descriptor, depth: int = 0, small: bool = False) -> st.SearchStrategy[Message]:
    """Messages of the real type with any subset of fields set to extreme values."""
    cls = _MESSAGE_CLASSES[descriptor.full_name]
    if depth > 3:
        return st.builds(cls)
    fields = {f.name: _values(f, depth, small) for f in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            if descriptor.fields_by_name[name].is_repeated:
                getattr(message, name).extend(value)
            elif isinstance(value, Message):
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=fields).map(build)


class _Draws:
    """A fuzzing.Chooser that draws from hypothesis, so it can shrink a failing mutation."""

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw

    def integer(self, low: int, high: int) -> int:
        return self._draw(st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self._draw(st.sampled_from(options))

    def binary(self, low: int, high: int) -> bytes:
        return self._draw(st.binary(min_size=low, max_size=high))


@st.composite
def _mutated(draw: st.DrawFn, seed: bytes, descriptor: Descriptor) -> bytes:
    return mutated(seed, descriptor, _Draws(draw))


def _body(fuzz: Fuzzed, method: str) -> st.SearchStrategy[bytes]:
    """Any kind of fuzzed body (or stream item) for `method`."""
    request = SERVICE.methods_by_name[method].input_type
    return st.one_of(
        st.binary(max_size=256),
        st.sampled_from(fuzz.seeds[method]).flatmap(lambda seed: _mutated(seed, request)),
        _messages(request).map(lambda m: m.SerializeToString()),
        st.sampled_from(fuzz.seeds[method]),
    )


# -- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@settings(FUZZ, max_examples=25)
@given(data=st.data())
async def test_random_bytes_get_an_answer(fuzzed: Fuzzed, method: str, data: st.DataObject) -> None:
    bodies = data.draw(
        st.lists(st.binary(max_size=512), min_size=1, max_size=1 if method not in STREAMS else 6)
    )
    await _send(fuzzed, method, bodies)


@pytest.mark.parametrize("method", METHODS)
@settings(FUZZ, max_examples=40)
@given(data=st.data())
async def test_mutated_valid_bodies_get_an_answer(fuzzed: Fuzzed, method: str, data: st.DataObject) -> None:
    request = SERVICE.methods_by_name[method].input_type
    seed = data.draw(st.sampled_from(fuzzed.seeds[method]))
    await _send(fuzzed, method, [data.draw(_mutated(seed, request))])


@pytest.mark.parametrize("method", METHODS)
@settings(FUZZ, max_examples=30)
@given(data=st.data())
async def test_extreme_messages_get_an_answer(fuzzed: Fuzzed, method: str, data: st.DataObject) -> None:
    request = SERVICE.methods_by_name[method].input_type
    await _send(fuzzed, method, [data.draw(_messages(request)).SerializeToString()])


@pytest.mark.parametrize("method", STREAMS)
@settings(FUZZ, max_examples=30)
@given(data=st.data())
async def test_streams_of_fuzzed_items_answer_every_item(
    fuzzed: Fuzzed, method: str, data: st.DataObject
) -> None:
    await _send(fuzzed, method, data.draw(st.lists(_body(fuzzed, method), min_size=1, max_size=8)))


async def test_still_serving_with_bounded_memory(fuzzed: Fuzzed) -> None:
    """Run last in this file: after every fuzz case above, quotad answers and has not bloated."""
    health: Any = health_pb2_grpc.HealthStub(fuzzed.channel)  # the typeshed stub knows only sync channels
    response = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    for method, bodies in fuzzed.seeds.items():  # and still decides
        await _send(fuzzed, method, bodies if method in STREAMS else bodies[:1])
    gc.collect()
    growth = _rss_bytes() - fuzzed.rss_at_start
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB"
