"""The storage seam: what the decision core needs from a store, and nothing more.

Only the composition root (cli.py) picks an implementation; the core sees this
Protocol. RedisStore (store/redis.py) is the one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from quotad_server.errors import QuotadError
from quotad_server.model import Cost, Limit, LimitStatus, Price, Priority, SettleOutcome


@dataclass(slots=True)  # a value, but not frozen: see quotad_server.model
class ReservePlan:
    """Everything one reservation needs, resolved by the core from the policy.

    `partition` is the unit of atomicity (see Policy.partition): every key the
    decision touches is placed in it. `fingerprint` identifies the request for
    idempotent retries ("" when there is no idempotency key).
    """

    partition: str
    tenant: str  # the tenant the caller acts for: recorded, and checked when it settles
    counted_as: str  # the tenant whose counters are charged (all unknown ones may share one set)
    subject: str
    limits: tuple[Limit, ...]
    input_tokens: int
    output_tokens: int
    lease_us: int
    record_ttl_us: int
    idempotency_key: str = ""
    fingerprint: str = ""
    cost_micro_usd: int = 0
    price: Price | None = None
    model: str = ""
    tier: str = ""
    max_output_tokens: int = 0  # the call's max_tokens (after the default): recorded to flag impossible usage
    priority: Priority = Priority.NORMAL
    # Waiting lines (see reserve.lua): the rank boost of the priority, and for a waiter
    # its ticket, whether to take a place when denied, the line's bound and the ticket's life.
    boost_us: int = 0
    ticket: str = ""
    enqueue: bool = False
    max_line: int = 1000
    ticket_ttl_ms: int = 3000
    # When the caller gives up (event-loop time), if it said: the store's call and the
    # script's deadline end no later, so nothing is admitted for a caller that has left.
    deadline: float | None = None
    # Charge every limit whatever it says (usage already spent): never denied, debt if need be.
    forced: bool = False
    # With escrow (see Policy.escrow): the index of `partition`, whose slice of each global limit
    # this decision is charged to.
    slice_index: int = 0


@dataclass(slots=True)  # a value, but not frozen: see quotad_server.model
class ReserveResult:
    """What the store decided. `limits` is empty on a replay (nothing was evaluated)."""

    allowed: bool
    reservation_id: str
    lease_expires_at_us: int
    limits: tuple[LimitStatus, ...]
    replayed: bool = False
    reserved: Cost | None = None
    queue_full: bool = False
    line: str = ""  # the waiting line the ticket holds a place in
    rank: int = 0  # its rank there (lower goes first): the order every replica wakes its waiters in
    spare: bool = False  # capacity is left on the line's limit that another waiter may fit


class Store(Protocol):
    """Atomic quota state. Every method raises StoreUnavailable when the store cannot answer."""

    async def reserve(self, plan: ReservePlan) -> ReserveResult:
        """Check every limit of the plan and reserve on all of them, or on none."""
        ...

    async def reserve_many(self, plans: Sequence[ReservePlan]) -> list[ReserveResult | QuotadError]:
        """reserve() for each plan, in one round trip; a failed item is its error, in its place."""
        ...

    async def commit_many(
        self, commits: Sequence[tuple[str, Cost]], retention_us: int, tenants: frozenset[str] | None = None
    ) -> list[SettleOutcome | QuotadError]:
        """settle() with actual usage for each (reservation id, usage), in one round trip."""
        ...

    async def peek(
        self, partition: str, tenant: str, subject: str, limits: tuple[Limit, ...], slice_index: int = 0
    ) -> tuple[LimitStatus, ...]:
        """The status of the limits, changing nothing (a limit in escrow: the partition's slice)."""
        ...

    async def rebalance(
        self,
        limit: Limit,
        partitions: Sequence[str],
        taker: int,
        keep: int,
        timeout_us: int,
        *,
        need: int = 0,
        tenant: str = "",
    ) -> int:
        """Move to partition `taker`'s slice of `limit` (held in escrow; of `tenant`'s slices for a
        tenant limit) what the other slices do not use, less `keep` units each, and have busier
        slices yield it up to `need` (or its capacity) as their usage frees; returns the units
        moved. The slices never sum to more than the limit, whatever fails when."""
        ...

    async def recover_transfers(self, partitions: Sequence[str], timeout_us: int) -> int:
        """Give back the escrow capacity left in flight longer than `timeout_us`; returns the units."""
        ...

    async def settle(
        self,
        reservation_id: str,
        actual: Cost | None,
        retention_us: int,
        tenants: frozenset[str] | None = None,
    ) -> SettleOutcome:
        """Commit `actual` usage (its cost is computed from the reservation's prices), or
        release when `actual` is None. Idempotent. Only a reservation made for one of `tenants`
        (None: any) is settled, checked in the same atomic step.

        Raises InvalidRequest for a malformed id, NotFound for an unknown one,
        FailedPrecondition when the reservation was settled the other way and
        PermissionDenied when it is another tenant's.
        """
        ...

    async def record_usage(self, groups: Sequence[tuple[str, str, int, Mapping[str, int]]]) -> None:
        """Add summed samples to usage statistics: (model, tier, window, field increments) per group."""
        ...

    async def read_usage_stats(self, model: str, tier: str) -> dict[str, int]:
        """The usage statistics of one (model, tier); see usage_stats.py."""
        ...

    async def leave_line(self, partition: str, ticket: str) -> None:
        """Give up a waiting place (the caller stopped waiting)."""
        ...

    async def watch_wakeups(self, wake: Callable[[str], None]) -> None:
        """Call `wake(line)` whenever capacity is freed on a limit with a waiting line; runs until cancelled."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; raise StoreUnavailable otherwise."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
