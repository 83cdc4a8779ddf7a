"""Structured logging: JSON lines when not on a terminal, one canonical line per RPC."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure_logging(log_format: str, level: str) -> None:
    """Configure structlog once, from the composition root (never at import)."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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
