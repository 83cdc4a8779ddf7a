"""Reading token usage from the shapes the OpenAI and Anthropic Python SDKs return (no I/O).

The SDKs are not dependencies: their usage objects are plain attribute bags
(pydantic models), which SimpleNamespace reproduces field for field.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from quotad import Usage

OPENAI_CHAT = SimpleNamespace(
    prompt_tokens=1200,
    completion_tokens=80,
    total_tokens=1280,
    prompt_tokens_details=SimpleNamespace(cached_tokens=1024, audio_tokens=0),
    completion_tokens_details=SimpleNamespace(reasoning_tokens=0),
)
OPENAI_RESPONSES = SimpleNamespace(
    input_tokens=900,
    output_tokens=40,
    total_tokens=940,
    input_tokens_details=SimpleNamespace(cached_tokens=512),
    output_tokens_details=SimpleNamespace(reasoning_tokens=10),
)
ANTHROPIC = SimpleNamespace(
    input_tokens=50,
    output_tokens=300,
    cache_read_input_tokens=2000,
    cache_creation_input_tokens=100,
    service_tier="standard",
)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        pytest.param(OPENAI_CHAT, Usage(1200, 80, 1024), id="openai-chat"),
        pytest.param(OPENAI_RESPONSES, Usage(900, 40, 512), id="openai-responses"),
        # Anthropic reports cache reads and writes beside input_tokens: they are added back.
        pytest.param(ANTHROPIC, Usage(2150, 300, 2000, 100), id="anthropic"),
        pytest.param(
            SimpleNamespace(input_tokens=7, output_tokens=3, cache_read_input_tokens=None),
            Usage(7, 3, 0),
            id="anthropic-without-cache",
        ),
        pytest.param(
            {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": None},
            Usage(10, 2, 0),
            id="openai-chat-json",
        ),
        pytest.param(
            SimpleNamespace(id="msg_1", usage=ANTHROPIC), Usage(2150, 300, 2000, 100), id="whole-response"
        ),
        pytest.param(Usage(1, 2, 0), Usage(1, 2, 0), id="usage-itself"),
    ],
)
def test_usage_is_read_from_provider_objects(usage: object, expected: Usage) -> None:
    assert Usage.of(usage) == expected


def test_cached_tokens_can_be_left_uncharged() -> None:
    usage = Usage.of(OPENAI_CHAT)
    assert usage.charged_input(exclude_cached=False) == 1200
    assert usage.charged_input(exclude_cached=True) == 176


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param(SimpleNamespace(tokens=5), id="unknown-shape"),
        pytest.param(SimpleNamespace(prompt_tokens="12", completion_tokens=1), id="not-an-int"),
        pytest.param(None, id="none"),
    ],
)
def test_unreadable_usage_is_a_type_error(usage: object) -> None:
    with pytest.raises(TypeError):
        Usage.of(usage)
