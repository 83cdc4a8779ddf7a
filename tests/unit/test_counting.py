"""Provider formulas without I/O: image tokens, model names, prices and their rounding."""

from __future__ import annotations

import pytest
from quotad_server.model import Price, round_half_even
from quotad_server.policy import PolicyError, default_encoding, parse_policy
from quotad_server.tokens import ImagePart, image_tokens
from quotad_server.usage_stats import output_bucket


@pytest.mark.parametrize(
    ("model", "width", "height", "detail", "tokens"),
    [
        # OpenAI's vision guide, tile models: 85 + 170 per 512px tile of the scaled image.
        ("gpt-4o", 1024, 1024, "high", 765),
        ("gpt-4o-2024-08-06", 2048, 4096, "high", 1105),
        ("gpt-4o", 4096, 8192, "low", 85),
        ("gpt-4o", 500, 300, "auto", 85 + 170),  # small images are not scaled up
        # Model-specific base and tile prices.
        ("gpt-4o-mini", 1024, 1024, "high", 2833 + 4 * 5667),
        ("gpt-4o-mini", 1024, 1024, "low", 2833),
        ("o1", 1024, 1024, "high", 75 + 4 * 150),
        # Patch models: 32px patches (at most 1536), times the model's multiplier.
        ("gpt-4.1-mini", 1024, 1024, "high", 1659),  # 1024 patches * 1.62 = 1658.88
        ("gpt-4.1-mini", 1800, 2400, "high", 2353),  # scaled to 1056x1408: 33 * 44 = 1452 * 1.62
        ("gpt-4.1-nano", 1024, 1024, "low", 2520),  # 1024 * 2.46 = 2519.04; detail does not matter
        ("o4-mini", 1800, 2400, "high", 2498),  # 1452 * 1.72 = 2497.44
        # Anthropic: (width * height) / 750, after its resize.
        ("claude-sonnet-4-5", 200, 200, "auto", 54),
        ("claude-sonnet-4-5", 1000, 1000, "auto", 1334),
        ("claude-sonnet-4-5", 1092, 1092, "auto", 1590),
        ("claude-sonnet-4-5", 4000, 3000, "auto", 1600),
    ],
)
def test_image_tokens_follow_the_published_formulas(
    model: str, width: int, height: int, detail: str, tokens: int
) -> None:
    assert image_tokens(model, ImagePart(width, height, detail)) == tokens


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::9xYz", "o200k_base"),
        ("ft:gpt-3.5-turbo-0125:acme::1", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("gpt-35-turbo-16k", "cl100k_base"),
        ("azure/gpt-4o", "o200k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("davinci-002", "cl100k_base"),
        ("gpt-oss-20b", "o200k_base"),
        ("o1", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("o1x-custom", None),
        ("claude-sonnet-4-5", None),
        ("text-davinci-003", None),  # p50k_base: a retired model's encoding, not bundled
    ],
)
def test_model_names_resolve_like_tiktoken(model: str, encoding: str | None) -> None:
    assert default_encoding(model) == encoding


def test_half_even_rounding() -> None:
    assert [round_half_even(n, 10) for n in (14, 15, 16, 25, 35, -15)] == [1, 2, 2, 2, 4, -2]
    mini = Price(150_000, 75_000, 600_000)  # gpt-4o-mini
    assert mini.cost_micro_usd(10, 0, 1) == 2  # 2.1
    assert mini.cost_micro_usd(10, 0, 0) == 2  # 1.5 -> even
    assert mini.cost_micro_usd(30, 0, 0) == 4  # 4.5 -> even


def test_cache_writes_and_long_context_prices() -> None:
    above = Price(6_000_000, 600_000, 22_500_000, 7_500_000)
    sonnet = Price(3_000_000, 300_000, 15_000_000, 3_750_000, threshold=200_000, above=above)
    assert sonnet.cost_micro_usd(10_200, 0, 500, cache_write_tokens=10_000) == 45_600
    assert sonnet.cost_micro_usd(250_000, 0, 1_000) == 250_000 * 6 + 22_500
    assert sonnet.script_arg() == "3000000 300000 15000000 3750000 200000 6000000 600000 22500000 7500000"
    assert Price(1, 2, 3).script_arg() == "1 2 3"  # what settle.lua read before issue 16
    assert Price(1, 2, 3, 4).script_arg() == "1 2 3 4 0"


def test_output_buckets_are_powers_of_two() -> None:
    assert [output_bucket(n) for n in (0, 1, 63, 64, 127, 128, 4096)] == [0, 1, 6, 7, 7, 8, 13]


def test_policy_overrides_are_validated() -> None:
    with pytest.raises(PolicyError, match="max_output_tokens 200 is more than context_window 100"):
        parse_policy(
            "defaults: {tier: t}\nmodels: {m: {context_window: 100, max_output_tokens: 200}}\n"
            "tiers: {t: {limits: []}}",
            "p.yaml",
        )
    policy = parse_policy(
        "defaults: {tier: t}\nprice_catalog: none\nmodels:\n"
        "  m:\n    price: {input: 1.25, output: 10, above: {threshold: 200000, input: 2.5, output: 15}}\n"
        "    service_tiers: {batch: {input: 0.625, output: 5}}\n"
        "tiers: {t: {limits: []}}",
        "p.yaml",
    )
    model = policy.models["m"]
    assert model.price is not None
    assert model.price.above is not None
    assert model.price.above.input == 2_500_000
    assert not policy.price_catalog
