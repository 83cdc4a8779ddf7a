"""The RESP encoding quotad sends (packed once, the same bytes every time), and its view of Redis's clock."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
from quotad_server.store.resp import Packed, RedisClock, pack


@pytest.mark.parametrize(
    "tail",
    [[], ["4"], ["4", "w", "r", "600", "60000000", "600", "b", "t", "100000", "60000000", "100000"]],
)
def test_packed_tail_encodes_as_the_whole_command(tail: list[str]) -> None:
    """A command with a packed tail is byte for byte the command with those arguments in it."""
    command: tuple[Any, ...] = (
        "EVALSHA",
        b"f" * 40,
        2,
        "q:{ab}:r:1",
        "q:{ab}:l:s::alice:wr",
        "reserve",
        "",
        1795733027944488,
        "ü",
    )
    assert pack(command, Packed.of(tail)) == hiredis.pack_command((*command, *tail))


def test_the_clock_trusts_the_shortest_round_trip_not_the_latest() -> None:
    """Redis's clock runs 5 s ahead of the loop's. A reply read 300 ms late (a lagging event loop)
    brackets Redis's reading loosely: it must not move the estimate by its lag."""
    clock = RedisClock()
    assert not clock.known
    clock.observe(redis_us=105_000_100, sent=100.0, received=100.0002)  # 200 us round trip
    assert abs(clock.redis_us(100.0) - 105_000_000) <= 100
    clock.observe(redis_us=105_001_000, sent=100.001, received=100.301)  # read 300 ms late
    assert abs(clock.redis_us(100.0) - 105_000_000) <= 100


def test_a_newer_sample_takes_over_as_the_best_one_ages() -> None:
    """A best sample ages, so that the estimate follows drift: one as good, a minute on, wins."""
    clock = RedisClock()
    clock.observe(redis_us=105_000_100, sent=100.0, received=100.0002)
    clock.observe(redis_us=165_002_100, sent=160.0, received=160.0003)  # 100 us worse, 60 s newer
    assert abs(clock.redis_us(160.0) - 165_002_000) <= 150
