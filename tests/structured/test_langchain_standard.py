"""LangChain's own standard chat-model tests (langchain-tests) against a live gateway serving the
default chat model, with tool calling, tool choice and structured output switched on.

Every test that forces a tool or a schema must pass. The ones marked xfail below fail because the
135M model, left to decide by itself (tool_choice auto), chooses badly: the answer is a valid shape
(text, or a valid call), but not the one the test wants.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langchain_tests")
pytest.importorskip("langchain_openai")

from langchain_openai import ChatOpenAI  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402

from tests.structured.conftest import CHAT  # noqa: E402

# The suite's coroutine tests carry no marker (LangChain's projects run pytest-asyncio in auto mode).
# One event loop for the module: langchain-openai keeps its async HTTP client between calls.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.filterwarnings("ignore::pytest.PytestWarning"),
]

_URL: dict[str, str] = {}
AUTO_CHOICE = "the 135M model, free to answer or call (tool_choice auto), does not call the tool the test expects"
JSON_MODE = (
    "json_mode has no schema: {type: json_object} admits any object, and the 135M model keeps adding keys "
    "until max_tokens (finish_reason length, reported as such; the schema tests pass)"
)
ARGUMENT = (
    "the call is forced and valid (magic_function with an integer input), but the 135M model picks the "
    "value: it writes input 100 for 'magic_function(3)'"
)


@pytest.fixture(autouse=True)
def _live_gateway(smol_server: Any) -> None:
    _URL["v1"] = f"{smol_server.url}/v1"


class TestGatewayChatOpenAI(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": CHAT,
            "base_url": _URL["v1"],
            "api_key": "unused",
            "temperature": 0,
            "max_tokens": 200,
            "stream_usage": True,
            "frequency_penalty": 0.5,  # greedy 135M output otherwise loops inside a JSON string until max_tokens
            "max_retries": 0,
            "timeout": 300,
        }

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @pytest.mark.xfail(reason=ARGUMENT, strict=False)
    def test_tool_calling(self, model: Any) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=ARGUMENT, strict=False)
    async def test_tool_calling_async(self, model: Any) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=AUTO_CHOICE, strict=False)
    def test_agent_loop(self, model: Any) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=JSON_MODE, strict=False)
    def test_json_mode(self, model: Any) -> None:
        super().test_json_mode(model)
