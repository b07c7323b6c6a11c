"""Tool calling on a local model: the prompt, the grammar that forces a call, and the calls
parsed back out of the text (docs/structured-output.md describes the format).

A model whose chat template takes `tools` gets them through it. Any other model gets the
generic format: a system-prompt block listing the functions as JSON schemas and the exact JSON
to answer with, a JSON array of calls `[{"name": ..., "arguments": {...}}]`. Earlier calls in the
history are rendered as that JSON, tool results as user messages naming the call.

`tool_choice` "required" or a named function: the answer is constrained to that array (the
arguments to each function's parameters schema). "auto": the model writes freely; an answer
that parses as calls to declared tools becomes tool calls (a bare array or object, or inside
<tool_call> tags as several chat templates ask), anything else is text.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.domain import (
    ChatMessage,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    Grammar,
    TokenDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from gateway.ids import unique_hex

ARGUMENT_PIECE = 24  # characters of arguments per streamed fragment
# Calls in one forced answer when the request sets parallel_tool_calls: true. Unset, a forced
# answer is one call: a small model tends to repeat its call until the budget runs out (repeats,
# same name and arguments, are dropped when parsing anyway).
MAX_PARALLEL = 4
_TAGGED = re.compile(r"^\s*<tool_call>\s*(.*?)\s*(?:</tool_call>\s*)?$", re.S)


def template_takes_tools(tokenizer: Any) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "tools" in template


def forced(request: GenerationRequest) -> bool:
    choice = request.tool_choice
    return bool(request.tools) and choice is not None and choice.mode == "required"


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def calls_schema(request: GenerationRequest) -> dict[str, Any]:
    """The JSON schema of the answer when a call is forced: an array of calls to the allowed tools."""
    name = request.tool_choice.name if request.tool_choice else None
    tools = [t for t in request.tools if name is None or t.name == name]
    items = _call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [_call_schema(t) for t in tools]}
    single = name is not None or request.parallel_tool_calls is not True
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1, "maxItems": 1 if single else MAX_PARALLEL}
    return schema


def with_tool_grammar(request: GenerationRequest) -> GenerationRequest:
    """The request with its sampling constrained to a call when the tool choice forces one."""
    if not forced(request):
        return request
    grammar = Grammar("json_schema", json.dumps(calls_schema(request)), param="tools")
    return replace(request, sampling=replace(request.sampling, grammar=grammar))


# prompts -------------------------------------------------------------------------------------
def _function(tool: Tool) -> dict[str, Any]:
    body: dict[str, Any] = {"name": tool.name, "parameters": json.loads(tool.parameters)}
    if tool.description:
        body["description"] = tool.description
    return body


def _calls_text(calls: tuple[ToolCall, ...]) -> str:
    return json.dumps([{"name": c.name, "arguments": _arguments(c.arguments)} for c in calls])


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def generic_block(request: GenerationRequest) -> str:
    lines = [
        "You can call these functions (JSON schemas of their parameters); take the arguments' values from the request:"
    ]
    lines += [json.dumps(_function(t)) for t in request.tools]
    example = '[{"name": "<function name>", "arguments": {<arguments>}}]'
    choice = request.tool_choice
    if choice is not None and choice.name:
        lines.append(f"Call the function {choice.name}: answer with only this JSON and nothing else: {example}")
    elif forced(request):
        lines.append(f"Call one or more of them: answer with only this JSON and nothing else: {example}")
    else:
        lines.append(f"To call functions, answer with only this JSON and nothing else: {example}")
        lines.append("Otherwise answer the user normally.")
    return "\n".join(lines)


def generic_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """The conversation for a template without tool support: tools in the system message,
    earlier calls as their JSON, tool results as user messages."""
    names = {c.id: c.name for m in request.messages or () for c in m.tool_calls}
    out: list[dict[str, Any]] = []
    for m in request.messages or ():
        if m.role == "tool":
            name = names.get(m.tool_call_id or "", "the function")
            out.append({"role": "user", "content": f"Result of {name} (call {m.tool_call_id}): {m.content or ''}"})
        elif m.tool_calls:
            out.append({"role": m.role, "content": ((m.content or "") + "\n" + _calls_text(m.tool_calls)).strip()})
        else:
            out.append({"role": m.role, "content": m.content or ""})
    if request.calls_tools:
        block = generic_block(request)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def template_messages(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """The conversation in the shape chat templates with tool support read (arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def template_tools(request: GenerationRequest) -> list[dict[str, Any]] | None:
    return [{"type": "function", "function": _function(t)} for t in request.tools] if request.calls_tools else None


# answers -------------------------------------------------------------------------------------
def parse_calls(text: str, tools: tuple[Tool, ...]) -> list[ToolCall] | None:
    """The calls an answer makes, or None when it is not (only) calls to declared tools."""
    tagged = _TAGGED.match(text)
    body = tagged.group(1) if tagged else text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(body)
    except ValueError:
        return None
    items = data if isinstance(data, list) else [data]
    names = {t.name for t in tools}
    calls: list[ToolCall] = []
    seen = set()
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _arguments(arguments)
        if not isinstance(arguments, dict):
            return None
        text = json.dumps(arguments, ensure_ascii=False)
        if (item["name"], text) not in seen:
            seen.add((item["name"], text))
            calls.append(ToolCall(f"call_{unique_hex()}", item["name"], text))
    return calls or None


def call_deltas(index: int, calls: list[ToolCall]) -> list[ToolCallDelta]:
    """Calls as stream pieces: id and name first, then the arguments in fragments."""
    out = []
    for number, call in enumerate(calls):
        out.append(ToolCallDelta(index, number, call.id, call.name, ""))
        args = call.arguments
        out += [
            ToolCallDelta(index, number, arguments=args[i : i + ARGUMENT_PIECE])
            for i in range(0, len(args), ARGUMENT_PIECE)
        ]
    return out


@dataclass
class _Choice:
    held: list[TokenDelta] = field(default_factory=list)
    text: str = ""
    holding: bool | None = None  # None: undecided (only whitespace so far)


async def tool_events(
    events: AsyncIterator[GenerationEvent], request: GenerationRequest
) -> AsyncIterator[GenerationEvent]:
    """The stream with calls turned into tool-call deltas: a choice whose answer may be a call
    (forced, or under "auto" opening with `[`, `{` or `<`) is held back until it ends."""
    must = forced(request)
    choices: dict[int, _Choice] = {}
    async for event in events:
        if not isinstance(event, TokenDelta):
            yield event
            continue
        state = choices.setdefault(event.index, _Choice(holding=True if must else None))
        state.text += event.text
        if state.holding is None and state.text.strip():
            state.holding = state.text.lstrip()[0] in "[{<"
        if state.holding is False:
            for held in [*state.held, event]:
                yield held
            state.held.clear()
            continue
        state.held.append(event)
        if event.finish_reason is None:
            continue
        calls = parse_calls(state.text, request.tools) if event.finish_reason != FinishReason.LENGTH else None
        if calls is None:
            for held in state.held:
                yield held
        else:
            for delta in call_deltas(event.index, calls):
                yield delta
            yield TokenDelta(event.index, "", finish_reason=FinishReason.TOOL_CALLS)
        state.held.clear()
