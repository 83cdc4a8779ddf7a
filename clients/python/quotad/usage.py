"""What an LLM call really used, read from the usage objects that provider SDKs return.

Duck typing only: the client depends on neither the OpenAI nor the Anthropic SDK. It
reads attributes (or the keys of a mapping, for raw JSON):

- OpenAI Chat Completions `usage`: input `prompt_tokens`, output `completion_tokens`,
  cache reads `prompt_tokens_details.cached_tokens`.
- OpenAI Responses `usage`: input `input_tokens`, output `output_tokens`, cache reads
  `input_tokens_details.cached_tokens`.
- Anthropic Messages `usage`: input `input_tokens` + `cache_read_input_tokens` +
  `cache_creation_input_tokens`, output `output_tokens`, cache reads `cache_read_input_tokens`.

OpenAI counts cached tokens inside its prompt tokens; Anthropic reports them beside its
input tokens, so they are added back: `input_tokens` is always every prompt token the
call processed, the same quantity a reservation estimates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call used. `cached_input_tokens` is the part of `input_tokens` read from cache."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0

    @classmethod
    def of(cls, usage: object) -> Usage:
        """Read an OpenAI or Anthropic usage object (or a whole response that has `.usage`)."""
        if isinstance(usage, Usage):
            return usage
        if not _has_any(usage, "prompt_tokens", "input_tokens") and _has_any(usage, "usage"):
            usage = _get(usage, "usage")
        if _has_any(usage, "prompt_tokens"):  # OpenAI Chat Completions
            return cls(
                input_tokens=_int(usage, "prompt_tokens"),
                output_tokens=_int(usage, "completion_tokens"),
                cached_input_tokens=_int(_get(usage, "prompt_tokens_details"), "cached_tokens"),
            )
        if _has_any(usage, "input_tokens_details"):  # OpenAI Responses
            return cls(
                input_tokens=_int(usage, "input_tokens"),
                output_tokens=_int(usage, "output_tokens"),
                cached_input_tokens=_int(_get(usage, "input_tokens_details"), "cached_tokens"),
            )
        if _has_any(usage, "input_tokens"):  # Anthropic Messages (cache fields may be absent)
            cache_read = _int(usage, "cache_read_input_tokens")
            return cls(
                input_tokens=_int(usage, "input_tokens")
                + cache_read
                + _int(usage, "cache_creation_input_tokens"),
                output_tokens=_int(usage, "output_tokens"),
                cached_input_tokens=cache_read,
            )
        raise TypeError(
            f"cannot read token usage from {type(usage).__name__}: expected an OpenAI or Anthropic"
            " usage object (prompt_tokens/completion_tokens or input_tokens/output_tokens)"
        )

    def charged_input(self, *, exclude_cached: bool) -> int:
        """Input tokens to charge: all of them, or without cache reads."""
        return self.input_tokens - self.cached_input_tokens if exclude_cached else self.input_tokens


def _get(source: object, name: str) -> object:
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _has_any(source: object, *names: str) -> bool:
    return any(_get(source, name) is not None for name in names)


def _int(source: object, name: str) -> int:
    value = _get(source, name) if source is not None else None
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"usage field {name} must be an int, got {value!r}")
    return value
