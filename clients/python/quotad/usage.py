"""What an LLM call really used, read from the objects that provider SDKs return.

Duck typing only: the client depends on neither the OpenAI nor the Anthropic SDK. It
reads attributes (or the keys of a mapping, for raw JSON).

Reports of a whole call's usage, each of which says everything:

- OpenAI Chat Completions: the `usage` (input `prompt_tokens`, output `completion_tokens`,
  cache reads `prompt_tokens_details.cached_tokens`), the whole `ChatCompletion`, or, when
  streaming with `stream_options={"include_usage": True}`, the last `ChatCompletionChunk`.
- OpenAI Responses: the `usage` (input `input_tokens`, output `output_tokens`, cache reads
  `input_tokens_details.cached_tokens`), the whole `Response`, or, when streaming, the
  `response.completed` event.
- Anthropic Messages: the `usage` (input `input_tokens` + `cache_read_input_tokens` +
  `cache_creation_input_tokens`, output `output_tokens`, cache reads
  `cache_read_input_tokens`), the whole `Message` (also what `stream.get_final_message()`
  returns), or the `message_start` event of a stream.

A report of part of a call's usage, which updates what came before it:

- Anthropic `message_delta` stream event (or its `usage`, a `MessageDeltaUsage` whose
  `input_tokens` is None): `output_tokens` so far, and the input and cache counts only when
  it carries them. A stream's counts are cumulative, so each count it carries replaces the
  `message_start`'s.

Stream events that carry no usage (OpenAI chunks before the last, Anthropic
`content_block_*`, `ping` and `message_stop`, Responses events before `response.completed`)
say nothing: a reservation's `record()` skips them, so a stream loop can record every event.

OpenAI counts cached tokens inside its prompt tokens; Anthropic reports them beside its
input tokens, so they are added back: `input_tokens` is always every prompt token the
call processed, the same quantity a reservation estimates. Anthropic's cache writes
(`cache_creation_input_tokens`) stay counted apart too, in `cache_write_input_tokens`, which
the server prices at the cache-write rate (1.25x input for 5-minute writes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# Anthropic stream events without usage; message_start and message_delta carry it.
_ANTHROPIC_EVENTS_WITHOUT_USAGE = frozenset(
    {"content_block_start", "content_block_delta", "content_block_stop", "message_stop", "ping"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call used. `cached_input_tokens` is the part of `input_tokens` read from the
    prompt cache, `cache_write_input_tokens` the part written to it."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0

    @classmethod
    def of(cls, *reports: object) -> Usage:
        """Read an OpenAI or Anthropic usage object, a whole response that has `.usage`, or a stream.

        For a stream, pass its events in order (events without usage are skipped), e.g.
        Anthropic's `Usage.of(message_start, message_delta)`. Raises TypeError when the reports
        cannot be read, or do not say both the input and the output tokens.
        """
        tally = Tally()
        for report in reports:
            if report is None:
                raise TypeError("cannot read token usage from None")
            found = Tally.of(report)
            if found is not None:
                tally = tally.then(found)
        usage = tally.usage()
        if usage is None:
            names = ", ".join(type(report).__name__ for report in reports) or "nothing"
            raise TypeError(
                f"no complete token usage in {names}: a stream's input tokens come with its first"
                " usage report (Anthropic's message_start), its output tokens with the last"
            )
        return usage

    def charged_input(self, *, exclude_cached: bool) -> int:
        """Input tokens to charge: all of them, or without cache reads."""
        return self.input_tokens - self.cached_input_tokens if exclude_cached else self.input_tokens


@dataclasses.dataclass(frozen=True, slots=True)
class Tally:
    """What the reports read so far say of one call's tokens; None where none has said yet.

    Input is kept as Anthropic splits it: `input_tokens` without the prompt tokens read from
    (`cache_read`) or written to (`cache_write`) the prompt cache. `whole` reports replace
    what came before them; the others (an Anthropic message_delta) update it.
    """

    input_tokens: int | None = None
    cache_read: int | None = None
    cache_write: int | None = None
    output_tokens: int | None = None
    whole: bool = False

    @classmethod
    def of(cls, report: object) -> Tally | None:
        """What one report says; None for a stream event that carries no usage.

        Raises TypeError for anything that is neither a usage report nor a stream event.
        """
        if isinstance(report, Usage):
            return cls(
                report.input_tokens - report.cached_input_tokens - report.cache_write_input_tokens,
                report.cached_input_tokens,
                report.cache_write_input_tokens,
                report.output_tokens,
                whole=True,
            )
        kind = _get(report, "type")
        if kind == "message_start":  # Anthropic: the input side, and the first output tokens
            return _read(_get(_get(report, "message"), "usage"), report)
        if kind == "message_delta":  # Anthropic: the output so far; never replaces the input
            found = _read(_get(report, "usage"), report, optional=True)
            return None if found is None else dataclasses.replace(found, whole=False)
        if kind in _ANTHROPIC_EVENTS_WITHOUT_USAGE:
            return None
        if isinstance(kind, str) and kind.startswith("response."):  # OpenAI Responses stream events
            return _read(_get(_get(report, "response"), "usage"), report, optional=True)
        if _get(report, "object") == "chat.completion.chunk":  # usage only in the last one
            return _read(_get(report, "usage"), report, optional=True)
        if not _has_any(report, "prompt_tokens", "input_tokens", "output_tokens") and _has_any(
            report, "usage"
        ):
            return _read(_get(report, "usage"), report)  # a whole response
        return _read(report, report)

    def then(self, later: Tally) -> Tally:
        """These counts after a later report: all of its own when it is whole, else each it has."""
        if later.whole:
            return later
        return Tally(
            _later(self.input_tokens, later.input_tokens),
            _later(self.cache_read, later.cache_read),
            _later(self.cache_write, later.cache_write),
            _later(self.output_tokens, later.output_tokens),
            whole=self.whole,
        )

    def usage(self) -> Usage | None:
        """The Usage these counts make, or None while the input or the output is unknown."""
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return self.usage_or(input_tokens=0, output_tokens=0)

    def usage_or(self, *, input_tokens: int, output_tokens: int) -> Usage:
        """The Usage these counts make, the given numbers standing in for what no report said."""
        output = self.output_tokens if self.output_tokens is not None else output_tokens
        if self.input_tokens is None:  # its cache counts alone say too little to charge from
            return Usage(input_tokens, output)
        cache_read, cache_write = self.cache_read or 0, self.cache_write or 0
        return Usage(self.input_tokens + cache_read + cache_write, output, cache_read, cache_write)


def _read(usage: object, report: object, *, optional: bool = False) -> Tally | None:
    """One usage object's counts; `optional`: None when absent (a stream event that has none)."""
    if usage is None:
        if optional:
            return None
        raise TypeError(
            f"cannot read token usage from {type(report).__name__}: expected an OpenAI or Anthropic"
            " usage object (prompt_tokens/completion_tokens or input_tokens/output_tokens), a response"
            " that has one, or a stream event"
        )
    if _has_any(usage, "prompt_tokens"):  # OpenAI Chat Completions
        cached = _int(_get(usage, "prompt_tokens_details"), "cached_tokens")
        return Tally(
            _int(usage, "prompt_tokens") - cached, cached, 0, _int(usage, "completion_tokens"), whole=True
        )
    if _has_any(usage, "input_tokens_details"):  # OpenAI Responses
        cached = _int(_get(usage, "input_tokens_details"), "cached_tokens")
        return Tally(
            _int(usage, "input_tokens") - cached, cached, 0, _int(usage, "output_tokens"), whole=True
        )
    if _has_any(usage, "input_tokens", "output_tokens"):  # Anthropic Messages (cache fields may be absent)
        input_tokens = _optional_int(usage, "input_tokens")
        # A MessageDeltaUsage has no input_tokens: it only updates what message_start said.
        whole = input_tokens is not None
        return Tally(
            input_tokens,
            _optional_int(usage, "cache_read_input_tokens"),
            _optional_int(usage, "cache_creation_input_tokens"),
            _int(usage, "output_tokens") if whole else _optional_int(usage, "output_tokens"),
            whole=whole,
        )
    return _read(None, report)


def _later(earlier: int | None, later: int | None) -> int | None:
    return earlier if later is None else later


def _get(source: object, name: str) -> object:
    if source is None:
        return None
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _has_any(source: object, *names: str) -> bool:
    return any(_get(source, name) is not None for name in names)


def _optional_int(source: object, name: str) -> int | None:
    value = _get(source, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"usage field {name} must be an int, got {value!r}")
    return value


def _int(source: object, name: str) -> int:
    return _optional_int(source, name) or 0
