"""The one log line per RPC: the JSON fast path writes what structlog would, and honours the level."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

import pytest
import structlog
from quotad_server import logs


class _Stderr(io.StringIO):
    """A stderr that is not a terminal, with its binary side kept for reading."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = io.BytesIO()

    @property
    def buffer(self) -> BinaryIO:
        return self.raw

    def isatty(self) -> bool:
        return False


@pytest.fixture
def fake_stderr() -> Iterator[_Stderr]:
    yield _Stderr()
    structlog.reset_defaults()
    logs._output.json_stream, logs._output.min_level = None, logging.INFO


def _lines(fake_stderr: _Stderr) -> list[dict[str, Any]]:
    return [json.loads(line) for line in fake_stderr.raw.getvalue().splitlines()]


def test_rpc_lines_match_structlog_json(fake_stderr: _Stderr) -> None:
    logs.configure_logging("auto", "info", fake_stderr)
    fields = {"method": "CheckAndReserve", "code": "OK", "latency_ms": 0.25, "subject": "alice"}
    logs.rpc_logger()(False, dict(fields))
    structlog.get_logger("quotad.rpc").info("rpc", **fields)

    fast, reference = _lines(fake_stderr)
    assert list(fast) == list(reference)  # same keys, same order
    assert {k: v for k, v in fast.items() if k != "timestamp"} == {
        k: v for k, v in reference.items() if k != "timestamp"
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", fast["timestamp"])
    assert fast["timestamp"] <= reference["timestamp"]  # written first


def test_rpc_errors_carry_the_traceback(fake_stderr: _Stderr) -> None:
    logs.configure_logging("json", "info", fake_stderr)
    try:
        raise RuntimeError("a bug")
    except RuntimeError as error:
        logs.rpc_logger()(True, {"method": "Commit", "code": "UNKNOWN", "exc_info": error})

    (line,) = _lines(fake_stderr)
    assert (line["level"], line["code"]) == ("error", "UNKNOWN")
    assert "exc_info" not in line
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].endswith("RuntimeError: a bug")


def test_rpc_lines_honour_the_level(fake_stderr: _Stderr) -> None:
    logs.configure_logging("json", "warning", fake_stderr)
    write = logs.rpc_logger()
    write(False, {"method": "GetUsage", "code": "OK"})
    write(True, {"method": "GetUsage", "code": "INTERNAL"})

    assert [(line["level"], line["code"]) for line in _lines(fake_stderr)] == [("error", "INTERNAL")]


def test_console_format_goes_through_structlog(fake_stderr: _Stderr) -> None:
    logs.configure_logging("console", "info", fake_stderr)
    logs.rpc_logger()(False, {"method": "Release", "code": "OK"})

    assert fake_stderr.raw.getvalue() == b""
    text = re.sub(r"\x1b\[[0-9;]*m", "", fake_stderr.getvalue())  # without the colours
    assert "rpc" in text
    assert "method=Release" in text


class _RawStream(io.RawIOBase):
    """An unbuffered stream, as stderr is under PYTHONUNBUFFERED: every write is one system call.

    It takes at most `chunk` bytes per write, as a pipe may."""

    def __init__(self, chunk: int = 1 << 20) -> None:
        self.data = bytearray()
        self.writes = 0
        self.chunk = chunk

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        taken = bytes(data[: self.chunk])
        self.data += taken
        self.writes += 1
        return len(taken)


def _written(raw: _RawStream) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.data.splitlines()]


async def test_rpc_lines_of_one_loop_turn_go_out_in_one_write(fake_stderr: _Stderr) -> None:
    raw = _RawStream()
    fake_stderr.raw = raw  # type: ignore[assignment]
    logs.configure_logging("json", "info", fake_stderr)
    log = logs.rpc_logger()
    for i in range(5):
        log(False, {"method": "CheckAndReserve", "code": "OK", "n": i})
    assert raw.writes == 0  # still this turn
    await asyncio.sleep(0)  # the turn ends
    assert raw.writes == 1
    assert [line["n"] for line in _written(raw)] == [0, 1, 2, 3, 4]
    log(False, {"method": "Commit", "code": "OK", "n": 5})
    structlog.get_logger("quotad").warning("meanwhile")  # any other line keeps the order
    assert [line.get("n", line["event"]) for line in _written(raw)] == [0, 1, 2, 3, 4, 5, "meanwhile"]


async def test_a_stream_that_takes_part_of_a_write_gets_the_rest(fake_stderr: _Stderr) -> None:
    raw = _RawStream(chunk=7)
    fake_stderr.raw = raw  # type: ignore[assignment]
    logs.configure_logging("json", "info", fake_stderr)
    log = logs.rpc_logger()
    for i in range(3):
        log(False, {"method": "CheckAndReserve", "code": "OK", "n": i})
    await asyncio.sleep(0)
    assert [line["n"] for line in _written(raw)] == [0, 1, 2]


def test_rpc_lines_outside_an_event_loop_are_written_at_once(fake_stderr: _Stderr) -> None:
    raw = _RawStream()
    fake_stderr.raw = raw  # type: ignore[assignment]
    logs.configure_logging("json", "info", fake_stderr)
    logs.rpc_logger()(False, {"method": "CheckAndReserve", "code": "OK"})
    assert _written(raw)[0]["method"] == "CheckAndReserve"
