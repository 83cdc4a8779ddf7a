"""Output reservations that learn from actual usage, and the recorder that feeds them.

For a model whose policy says `output_estimate: learned`, a call reserves
min(max_output_tokens, the learned quantile of actual output tokens) for its model
and tier, instead of max_output_tokens, once enough Commits have been seen. The
statistics are in Redis (usage_stats.py), shared by all replicas; each replica
re-reads a (model, tier) at most every `refresh_s` seconds, one read at a time.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from quotad_server.errors import StoreUnavailable
from quotad_server.policy import ModelPolicy
from quotad_server.store import Store
from quotad_server.usage_stats import UsageSample, increments, output_quantile

_log = structlog.get_logger("quotad.learning")
DEFAULT_WINDOW = 10_000


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


class UsageRecorder:
    """Adds committed calls to the shared usage statistics, in batches.

    Samples are summed in memory per (model, tier) and written every `flush_s` seconds in
    one script call per (model, tier): the statistics cost Redis almost nothing per Commit.
    With `flush_s` 0 every Commit writes at once (tests). `flush()` writes what is pending
    (on shutdown).
    """

    def __init__(self, store: Store, *, flush_s: float = 1.0) -> None:
        self._store = store
        self._flush_s = flush_s
        self._pending: dict[tuple[str, str], tuple[int, dict[str, int]]] = {}
        self._timer: asyncio.Task[None] | None = None

    async def add(self, samples: list[UsageSample], windows: dict[str, int]) -> None:
        for sample in samples:
            key = (sample.model, sample.tier)
            window, fields = self._pending.get(key, (windows.get(sample.model, DEFAULT_WINDOW), {}))
            for field, increment in increments(sample).items():
                fields[field] = fields.get(field, 0) + increment
            self._pending[key] = (window, fields)
        if self._flush_s <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later(), name="quotad-usage-stats")

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_s)
        self._timer = None
        await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            await self._store.record_usage(
                [(model, tier, window, fields) for (model, tier), (window, fields) in pending.items()]
            )
        except StoreUnavailable as error:  # advice, not accounting: drop it rather than pile it up
            _log.warning("usage statistics not recorded", error=str(error), groups=len(pending))
