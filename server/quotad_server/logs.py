"""Structured logging: JSON lines when not on a terminal, one canonical line per RPC."""

from __future__ import annotations

import asyncio
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
    """What configure_logging chose: the JSON stream (None: console format) and the lowest level written."""

    json_stream: BinaryIO | None = None
    min_level = logging.INFO


_output = _Output()


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
    processors: list[structlog.typing.Processor] = [
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
    flush_scheduled = False

    def flush() -> None:
        nonlocal flush_scheduled
        flush_scheduled = False
        stream.flush()

    def as_json(error: bool, fields: dict[str, Any]) -> None:
        nonlocal flush_scheduled
        if not (errors if error else info):
            return
        exc_info = fields.pop("exc_info", None)
        fields["event"] = "rpc"
        fields["level"] = "error" if error else "info"
        stamp(None, "", fields)
        if exc_info is not None:  # last, as in the structlog chain
            fields["exc_info"] = exc_info
            structlog.processors.format_exc_info(None, "", fields)
        stream.write(orjson.dumps(fields, default=repr) + b"\n")
        # The lines of one turn of the event loop (replies that came back together) go out in
        # one write, at the end of that turn: one system call per turn, not one per RPC.
        if not flush_scheduled:
            try:
                asyncio.get_running_loop().call_soon(flush)
            except RuntimeError:  # no event loop (a tool, a test): now
                stream.flush()
                return
            flush_scheduled = True

    return as_json
