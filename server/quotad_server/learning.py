"""Output reservations that learn from actual usage, and the recorder that feeds them.

For a model whose policy says `output_estimate: learned`, a call reserves
min(max_output_tokens, the learned quantile of actual output tokens) for its model,
tier and max_output_tokens bucket (powers of two: calls allowed 64 tokens learn apart from
calls allowed 4096), instead of max_output_tokens, once enough Commits have been seen. The
statistics are in Redis (usage_stats.py), shared by all replicas; each replica
re-reads a (model, tier) at most every `refresh_s` seconds, one read at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import structlog

from quotad_server.errors import StoreUnavailable
from quotad_server.policy import ModelPolicy
from quotad_server.store import Store
from quotad_server.usage_stats import UsageSample, increments, output_bucket, output_quantile

_log = structlog.get_logger("quotad.learning")
DEFAULT_WINDOW = 10_000
WARMUP_REFRESH_S = 0.25  # how soon a (model, tier) still short of samples is read again


class OutputEstimator:
    """The learned output reservations, per (model, tier) and max_output_tokens bucket.

    One read of a (model, tier)'s statistics serves all its buckets for `refresh_s`; a bucket
    still short of samples is read again after WARMUP_REFRESH_S at most, so learning starts as
    soon as the samples are there rather than a whole `refresh_s` later.
    """

    def __init__(
        self, store: Store, *, refresh_s: float = 5.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._monotonic = monotonic  # when statistics were read: a dependency, so tests move it by hand
        self._warmup_s = min(refresh_s, WARMUP_REFRESH_S)
        # (model, tier) -> (read at, statistics, learned value per bucket)
        self._read: dict[tuple[str, str], tuple[float, Mapping[str, int], dict[int, int | None]]] = {}
        self._reading: dict[tuple[str, str], asyncio.Future[Mapping[str, int]]] = {}

    async def learned(self, model: ModelPolicy, tier: str, max_output_tokens: int = 0) -> int | None:
        """The learned output reservation for calls of (model, tier) allowed `max_output_tokens`
        (0: calls without one), or None while their samples are too few."""
        key = (model.name, tier)
        bucket = output_bucket(max_output_tokens)
        cached = self._read.get(key)
        if cached is not None:
            read_at, stats, values = cached
            if bucket not in values:
                values[bucket] = self._quantile(model, stats, bucket)
            value = values[bucket]
            age = self._monotonic() - read_at
            if age < (self._refresh_s if value is not None else self._warmup_s):
                return value
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._fetch(key))
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        try:
            stats = await asyncio.shield(reading)
        except StoreUnavailable:  # statistics are advice: keep the last
            return cached[2].get(bucket) if cached is not None else None
        values = self._read[key][2]
        if bucket not in values:
            values[bucket] = self._quantile(model, stats, bucket)
        return values[bucket]

    @staticmethod
    def _quantile(model: ModelPolicy, stats: Mapping[str, int], bucket: int) -> int | None:
        return output_quantile(stats, model.learned_quantile, model.learned_min_samples, bucket)

    async def _fetch(self, key: tuple[str, str]) -> Mapping[str, int]:
        stats = await self._store.read_usage_stats(*key)
        self._read[key] = (self._monotonic(), stats, {})
        return stats

    async def estimate(self, model: ModelPolicy, tier: str, max_output_tokens: int) -> int:
        """The output tokens to reserve for a call allowed `max_output_tokens` (> 0)."""
        if not model.learned:
            return max_output_tokens
        learned = await self.learned(model, tier, max_output_tokens)
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
