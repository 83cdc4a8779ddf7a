"""Output reservations that learn from actual usage.

For a model whose policy says `output_estimate: learned`, a call reserves
min(max_output_tokens, the learned quantile of actual output tokens) for its model
and tier, instead of max_output_tokens, once enough Commits have been seen. The
statistics are in Redis (usage_stats.py), shared by all replicas; each replica
re-reads a (model, tier) at most every `refresh_s` seconds, one read at a time.
"""

from __future__ import annotations

import asyncio
import time

from quotad_server.errors import StoreUnavailable
from quotad_server.policy import ModelPolicy
from quotad_server.store import Store
from quotad_server.usage_stats import output_quantile


class OutputEstimator:
    def __init__(self, store: Store, *, refresh_s: float = 5.0) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._learned: dict[tuple[str, str], tuple[float, int | None]] = {}
        self._reading: dict[tuple[str, str], asyncio.Future[int | None]] = {}

    async def learned(self, model: ModelPolicy, tier: str) -> int | None:
        """The learned output reservation for (model, tier), or None while samples are too few."""
        key = (model.name, tier)
        cached = self._learned.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read(model, tier))
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        try:
            return await asyncio.shield(reading)
        except StoreUnavailable:
            return cached[1] if cached is not None else None  # statistics are advice: keep the last

    async def _read(self, model: ModelPolicy, tier: str) -> int | None:
        stats = await self._store.read_usage_stats(model.name, tier)
        value = output_quantile(stats, model.learned_quantile, model.learned_min_samples)
        self._learned[(model.name, tier)] = (time.monotonic() + self._refresh_s, value)
        return value

    async def estimate(self, model: ModelPolicy, tier: str, max_output_tokens: int) -> int:
        """The output tokens to reserve for a call allowed `max_output_tokens`."""
        if not model.learned:
            return max_output_tokens
        learned = await self.learned(model, tier)
        return max_output_tokens if learned is None else min(max_output_tokens, learned)
