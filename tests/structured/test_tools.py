"""Tool calling on the default model through the real HTTP stack, with the OpenAI SDK."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.structured.conftest import CHAT

pytestmark = [pytest.mark.slow]

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid_calls(message, only: str | None = None) -> None:  # type: ignore[no-untyped-def]
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert only is None or call.function.name == only
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_required_and_named_choices_call_with_valid_arguments(client: openai.OpenAI, temperature: float) -> None:
    for choice, only in [("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")]:
        resp = client.chat.completions.create(
            model=CHAT, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=temperature, seed=1, max_tokens=80
        )  # type: ignore[arg-type]
        assert resp.choices[0].finish_reason == "tool_calls"
        _valid_calls(resp.choices[0].message, only)
        if only:
            assert len(resp.choices[0].message.tool_calls or []) == 1


def test_parallel_tool_calls(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris, and in Rome?"}]
    for parallel, most in [(False, 1), (True, 4)]:
        resp = client.chat.completions.create(
            model=CHAT, messages=ask, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, temperature=0
        )  # type: ignore[arg-type]
        calls = resp.choices[0].message.tool_calls or []
        assert 1 <= len(calls) <= most and len({(c.function.name, c.function.arguments) for c in calls}) == len(calls)


def test_none_and_auto_answer_in_a_valid_shape(client: openai.OpenAI) -> None:
    none = client.chat.completions.create(
        model=CHAT, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30
    )  # type: ignore[arg-type]
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = client.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS, temperature=0, max_tokens=60)  # type: ignore[arg-type]
    message = auto.choices[0].message
    if message.tool_calls:  # the model's choice: either a valid call or text
        assert auto.choices[0].finish_reason == "tool_calls"
        _valid_calls(message)
    else:
        assert message.content and auto.choices[0].finish_reason in ("stop", "length")


def test_sdk_stream_helper_accumulates_the_call(client: openai.OpenAI) -> None:
    tools = [openai.pydantic_function_tool(_Weather)]
    with client.chat.completions.stream(
        model=CHAT, messages=ASK, tools=tools, tool_choice="required", temperature=0, max_tokens=80
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert any(e.type == "tool_calls.function.arguments.delta" for e in events)
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "_Weather"
    assert isinstance(call.function.parsed_arguments, _Weather)
    raw = list(
        client.chat.completions.create(
            model=CHAT, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80, stream=True
        )  # type: ignore[arg-type]
    )
    first = raw[0].choices[0].delta.tool_calls[0]  # type: ignore[index]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name  # type: ignore[union-attr]
    assert raw[-1].choices[0].finish_reason == "tool_calls"


from pydantic import BaseModel  # noqa: E402


class _Weather(BaseModel):
    city: str


def test_tool_results_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=CHAT, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )  # type: ignore[arg-type]
    message = first.choices[0].message
    call = message.tool_calls[0]  # type: ignore[index]
    history = [
        *ASK,
        message.model_dump(exclude_none=True),  # content null: sent as the SDK gives it
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "celsius"})},
    ]
    second = client.chat.completions.create(model=CHAT, messages=history, tools=TOOLS, temperature=0, max_tokens=40)  # type: ignore[arg-type]
    assert second.choices[0].message.content or second.choices[0].message.tool_calls


def test_tool_choice_naming_an_unknown_function_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=CHAT, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}
        )  # type: ignore[arg-type]
    assert info.value.param == "tool_choice"
