"""Structured logging: JSON lines when not on a terminal, one canonical line per RPC."""

from __future__ import annotations

import logging
import sys
import time

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger


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


def configure_logging(log_format: str, level: str) -> None:
    """Configure structlog once, from the composition root (never at import)."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        _UtcTimestamp(),
        structlog.processors.format_exc_info,
    ]
    if as_json:
        # orjson renders bytes straight to the stream: the cheapest path for a line per RPC.
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory: structlog.typing.WrappedLogger = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
