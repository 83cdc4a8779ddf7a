"""The RESP encoding quotad sends: packed once, the same bytes as packed every time."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
from quotad_server.store.resp import Packed, pack


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
