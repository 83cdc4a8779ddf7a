"""Model prices and context windows from a maintained catalog, overridable by the policy.

The catalog is Pydantic's `genai-prices` package (its bundled data: never the network).
Chosen against LiteLLM's `model_prices_and_context_window.json` (see docs/pricing.md for
the figures, measured on genai-prices 0.2.3 and litellm 1.110.2):

- both keep cache-read and cache-write prices, prices above a context threshold and
  batch / flex / priority prices, and both are updated every few days;
- LiteLLM's JSON knows more context windows (3890 entries against 1419) and is the only
  one with maximum outputs (3517 entries), but it ships only inside the `litellm` wheel:
  44 MB, 133 MB installed, ~25 required dependencies (openai, boto3, tokenizers, aiohttp...);
- genai-prices is 173 kB with pydantic (already ours) and one small HTTP client, typed,
  and matches model names the providers' way (dated snapshots, vendor prefixes).

So: genai-prices, loaded once at start (~0.7 s, ~30 MiB), with the policy filling what it
lacks (a model's `max_output_tokens`, a missing `context_window`) and overriding any entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from quotad_server.model import Price, ServiceTier
from quotad_server.policy import ModelPolicy

MAX_PRICE_MICRO_USD = 1_000_000_000  # $1000 per million tokens: keeps settle.lua's integers exact
# What genai-prices calls each service tier in its price variants.
_TIER_CONTEXT: dict[ServiceTier, dict[str, str]] = {
    ServiceTier.BATCH: {"processing": "batch"},
    ServiceTier.FLEX: {"service_tier": "flex"},
    ServiceTier.PRIORITY: {"service_tier": "priority"},
}
# Names callers use for a catalog model (Azure deployments spell GPT-3.5 without the dot).
_ALIASES = ((re.compile(r"^gpt-35-turbo"), "gpt-3.5-turbo"),)


@dataclass(frozen=True, slots=True)
class ModelTerms:
    """What applies to one model: its prices per service tier, context window and maximum output.

    `source` says where each came from: "catalog:<provider>/<id>", "policy", or "" when unknown.
    """

    model: str
    prices: Mapping[ServiceTier, Price] = field(default_factory=dict)
    context_window: int | None = None
    max_output_tokens: int | None = None
    provider: str = ""
    source: str = ""

    def price(self, tier: ServiceTier = ServiceTier.STANDARD) -> Price | None:
        return self.prices.get(tier)


def _micros(value: Decimal) -> int:
    """Dollars per million tokens to whole micro-dollars per million tokens (half to even)."""
    return int((value * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


class Catalog:
    """Looks models up in genai-prices' bundled data; the lookups are remembered."""

    def __init__(self) -> None:
        from genai_prices import data_snapshot  # noqa: PLC0415 - imported at start only (~0.7 s)

        self._snapshot = data_snapshot.get_snapshot()
        self._found: dict[tuple[str, str], ModelTerms | None] = {}

    def lookup(self, model: str, provider: str = "") -> ModelTerms | None:
        """The catalog's terms for `model` (as a caller names it), or None when it has none."""
        key = (model, provider)
        if key not in self._found:
            self._found[key] = self._lookup(model, provider)
        return self._found[key]

    def _lookup(self, model: str, provider: str) -> ModelTerms | None:
        name = model.lower()
        for pattern, replacement in _ALIASES:
            name = pattern.sub(replacement, name)
        try:
            found_provider, info = self._snapshot.find_provider_model(name, None, provider or None, None)
        except LookupError:
            return None
        now = datetime.now(tz=UTC)
        prices: dict[ServiceTier, Price] = {}
        standard = _price(info.get_prices(now))
        if standard is not None:
            prices[ServiceTier.STANDARD] = standard
        for tier, context in _TIER_CONTEXT.items():
            if any(variant.when == context for variant in info.price_variants or ()):
                variant = _price(info.get_prices(now, context))
                if variant is not None:
                    prices[tier] = variant
        return ModelTerms(
            model=model,
            prices=prices,
            context_window=info.context_window,
            provider=found_provider.id,
            source=f"catalog:{found_provider.id}/{info.id}",
        )


def _tiered(value: Any) -> tuple[Decimal | None, int, Decimal | None]:
    """(base price, threshold, price above it) of one genai-prices price."""
    if value is None:
        return None, 0, None
    if isinstance(value, Decimal):
        return value, 0, None
    tiers = value.tiers
    return value.base, (tiers[0].start if tiers else 0), (tiers[0].price if tiers else None)


_KEYS = ("input_mtok", "cache_read_mtok", "output_mtok", "cache_write_mtok")


def _rates(values: list[Decimal | None]) -> Price | None:
    """(input, cache read, output, cache write) in $/M as a Price; None without an input price, or
    beyond what settle.lua keeps exact."""
    micros = [None if value is None else _micros(value) for value in values]
    m_in, m_read, m_out, m_write = micros
    if m_in is None:
        return None
    if m_out is None:  # embeddings and the like: no output to pay for
        m_out = 0
    if any(m is not None and not 0 <= m <= MAX_PRICE_MICRO_USD for m in micros):
        return None
    return Price(m_in, m_in if m_read is None else m_read, m_out, m_write)


def _price(model_price: Any) -> Price | None:
    """A genai-prices ModelPrice as quotad's Price, with its long-context prices if it has any."""
    tiered = [_tiered(getattr(model_price, key, None)) for key in _KEYS]
    base = _rates([base for base, _, _ in tiered])
    if base is None:
        return None
    threshold = next((start for _, start, _ in tiered if start), 0)
    if threshold:  # a price without tiers keeps its base above the threshold
        above = _rates([high if high is not None else low for low, _, high in tiered])
        if above is not None:
            return replace(base, threshold=threshold, above=above)
    return base


def resolve(catalog: Catalog | None, model: str, settings: ModelPolicy | None) -> ModelTerms:
    """The terms of `model`: the catalog's entry (under the policy's catalog_name and provider,
    if it gives them), with each thing the policy gives in its place."""
    found = None
    if catalog is not None and model:
        name = settings.catalog_name if settings and settings.catalog_name else model
        found = catalog.lookup(name, settings.provider or "" if settings else "")
    prices: dict[ServiceTier, Price] = dict(found.prices) if found else {}
    window = found.context_window if found else None
    maximum = None
    sources = [found.source] if found else []
    if settings is not None:
        overrides = [
            settings.price,
            *settings.service_tiers.values(),
            settings.context_window,
            settings.max_output_tokens,
        ]
        if any(value is not None for value in overrides):
            sources.append("policy")
        if settings.price is not None:  # the catalog's prices were another model's: drop them all
            prices = {ServiceTier.STANDARD: settings.price}
        prices.update(settings.service_tiers)
        window = settings.context_window or window
        maximum = settings.max_output_tokens
    if window is not None and maximum is not None:
        maximum = min(maximum, window)
    return ModelTerms(
        model=model,
        prices=prices,
        context_window=window,
        max_output_tokens=maximum,
        provider=found.provider if found else "",
        source=" + ".join(sources),
    )
