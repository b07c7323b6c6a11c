"""Tools and structured output through a gateway whose deployment is another gateway (the one
serving SmolLM2): the openai dialect passes the fields through and the answers equal the
upstream's own; the tgi dialect maps grammar and refuses tools by name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import LiveServer
from tests.structured.conftest import CHAT
from tests.structured.test_tools import ASK, TOOLS
from tests.upstream.conftest import front, sdk, upstream

pytestmark = [pytest.mark.slow]

SLOW_OK = {"timeouts": {"per_try": 120, "total": 240}}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def chain(smol_server: LiveServer) -> Iterator[LiveServer]:
    models = [
        {
            "name": "remote",
            "task": "text-generation",
            "backend": upstream(f"{smol_server.url}/v1", model=CHAT, **SLOW_OK),
        },
        {
            "name": "remote-tgi",
            "task": "text-generation",
            "backend": upstream(smol_server.url, dialect="tgi", **SLOW_OK),
        },
    ]
    with front(models) as server:
        server.wait_ready(30)
        yield server


def _calls(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]


def test_tools_and_response_format_answers_equal_the_upstreams(chain: LiveServer, client: openai.OpenAI) -> None:
    via = sdk(chain, timeout=240)
    named = {"type": "function", "function": {"name": "get_weather"}}
    args: dict[str, Any] = dict(messages=ASK, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=80)
    direct = client.chat.completions.create(model=CHAT, **args)
    relayed = via.chat.completions.create(model="remote", **args)
    assert relayed.choices[0].finish_reason == direct.choices[0].finish_reason == "tool_calls"
    assert _calls(relayed.choices[0].message) == _calls(direct.choices[0].message) != []
    assert relayed.choices[0].message.content is None
    streamed = list(via.chat.completions.create(model="remote", stream=True, **args))
    pieces = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].function.name == "get_weather" and pieces[0].id  # type: ignore[union-attr]
    assert (
        "".join(p.function.arguments or "" for p in pieces)
        == direct.choices[0].message.tool_calls[0].function.arguments
    )  # type: ignore[index,union-attr]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    fmt_args: dict[str, Any] = dict(messages=[{"role": "user", "content": "A person"}], temperature=0, max_tokens=60)
    want = client.chat.completions.create(model=CHAT, response_format=fmt, **fmt_args).choices[0].message.content
    got = via.chat.completions.create(model="remote", response_format=fmt, **fmt_args).choices[0].message.content
    assert got == want and json.loads(got or "")["age"] is not None


def test_tool_messages_pass_through(chain: LiveServer, client: openai.OpenAI) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]  # fmt: skip
    args: dict[str, Any] = dict(messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=20)
    direct = client.chat.completions.create(model=CHAT, **args).choices[0].message.content
    relayed = sdk(chain, timeout=240).chat.completions.create(model="remote", **args).choices[0].message.content
    assert relayed == direct and relayed


def test_tgi_dialect_maps_grammar_and_refuses_tools(chain: LiveServer, smol_server: LiveServer) -> None:
    body = {"inputs": "A person:", "parameters": {"max_new_tokens": 40, "grammar": {"type": "json", "value": SCHEMA}}}
    direct = httpx.post(f"{smol_server.url}/generate", json=body, timeout=240).json()["generated_text"]
    completion = sdk(chain, timeout=240).completions.create(
        model="remote-tgi",
        prompt="A person:",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
    )
    assert completion.choices[0].text == direct and json.loads(direct)["name"] is not None
    with pytest.raises(openai.BadRequestError) as info:
        sdk(chain).chat.completions.create(model="remote-tgi", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    assert info.value.param == "tools" and info.value.code == "unsupported_parameter"
