"""Structured logging: JSON lines when not on a terminal, one canonical line per RPC."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

RpcLogger = Callable[[bool, dict[str, Any]], None]
"""Writes one RPC's line: (is it an error, its fields)."""


class _Output:
    """What configure_logging chose: the JSON stream (None: console format) and the lowest level written.

    RPC lines wait in `pending` until the end of the event-loop turn that wrote them, then
    go out in one write: one system call per turn, not per RPC, whatever the stream's own
    buffering (PYTHONUNBUFFERED, which container images often set, makes every write a
    system call). Any other log line first writes the pending ones, so lines keep their order.
    """

    json_stream: BinaryIO | None = None
    min_level = logging.INFO
    pending: list[bytes]
    scheduled_on: asyncio.AbstractEventLoop | None = None  # the loop that will write `pending`

    def __init__(self) -> None:
        self.pending = []

    def add(self, line: bytes) -> None:
        self.pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a tool, a test): now
            self.write_pending()
            return
        if self.scheduled_on is not loop:  # (a loop that stopped first never will)
            loop.call_soon(self.write_pending)
            self.scheduled_on = loop

    def write_pending(self) -> None:
        self.scheduled_on = None
        stream = self.json_stream
        if not self.pending or stream is None:
            return
        data = memoryview(b"".join(self.pending))
        self.pending.clear()
        while data:  # an unbuffered (raw) stream may take part of it
            written = stream.write(data)
            if written is None:  # a non-blocking stream that is full: drop the lines, never spin
                break
            data = data[written:]
        stream.flush()


_output = _Output()


def _write_pending_rpc_lines(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    _output.write_pending()
    return event_dict


class _UtcTimestamp:
    """structlog's TimeStamper(fmt="iso", utc=True) output, formatting the date once per second.

    It runs for every RPC's log line: datetime.isoformat() there costs as much as the rest
    of the line.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event_dict["timestamp"] = f"{self._prefix}.{nanos // 1000:06d}Z"
        return event_dict


def configure_logging(log_format: str, level: str, stream: TextIO | None = None) -> None:
    """Configure structlog once, from the composition root (never at import). `stream`: stderr."""
    stream = stream or sys.stderr
    as_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    _output.write_pending()  # lines of a previous configuration
    atexit.unregister(_output.write_pending)  # once: the last turn's lines, if no loop writes them
    atexit.register(_output.write_pending)
    processors: list[structlog.typing.Processor] = [
        _write_pending_rpc_lines,
        structlog.processors.add_log_level,
        _UtcTimestamp(),
        structlog.processors.format_exc_info,
    ]
    _output.min_level = logging.getLevelNamesMapping()[level.upper()]
    _output.json_stream = stream.buffer if as_json else None
    if as_json:
        # orjson renders bytes straight to the stream: the cheapest path for a line per RPC.
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory: structlog.typing.WrappedLogger = structlog.BytesLoggerFactory(file=stream.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_output.min_level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def rpc_logger() -> RpcLogger:
    """The writer of the one line per RPC, as configured.

    JSON lines are the same as structlog writes (fields, then event, level and timestamp),
    written here directly: structlog's processor chain cost as much as the rest of a
    decision's own Python. They reach the stream at the end of the event-loop turn that
    wrote them. The console format goes through structlog.
    """
    stream = _output.json_stream
    if stream is None:
        log = structlog.get_logger("quotad.rpc").bind()

        def through_structlog(error: bool, fields: dict[str, Any]) -> None:
            (log.error if error else log.info)("rpc", **fields)

        return through_structlog

    stamp = _UtcTimestamp()
    info, errors = _output.min_level <= logging.INFO, _output.min_level <= logging.ERROR

    def as_json(error: bool, fields: dict[str, Any]) -> None:
        if not (errors if error else info):
            return
        exc_info = fields.pop("exc_info", None)
        fields["event"] = "rpc"
        fields["level"] = "error" if error else "info"
        stamp(None, "", fields)
        if exc_info is not None:  # last, as in the structlog chain
            fields["exc_info"] = exc_info
            structlog.processors.format_exc_info(None, "", fields)
        _output.add(orjson.dumps(fields, default=repr) + b"\n")

    return as_json
