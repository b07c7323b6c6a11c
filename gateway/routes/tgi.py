"""TGI-compatible text generation: POST /, /generate, /generate_stream and GET /info.

They serve the default text-generation model; `POST /models/{id}` reuses
`text_generation` for text-generation models. GET /health lives in routes/ops.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway import __version__
from gateway.backends.base import Backend
from gateway.backends.registry import Entry
from gateway.domain import StreamEnd, Task, TokenDelta, Usage
from gateway.error_handlers import hf_error_body
from gateway.errors import InvalidRequest
from gateway.protocol import tgi
from gateway.protocol.hf import HFCall, parse_call, read_body
from gateway.routes.common.deps import StateDep, context
from gateway.routes.common.responses import FastJSONResponse
from gateway.routes.common.sse import sse_response
from gateway.services.metering import run_generation, stream_generation
from gateway.services.resolve import check_task, resolve_entry
from gateway.services.streams import gather_or_cancel, primed, until_disconnect
from gateway.state import AppState

router = APIRouter(tags=["tgi"])


def default_entry(state: AppState, request: Request) -> Entry:
    return resolve_entry(state, context(request), None, Task.TEXT_GENERATION)


def info_body(entry: Entry) -> dict[str, Any]:
    """TGI/TEI-style endpoint info."""
    info = entry.backend.info()
    task = entry.task
    return {
        "model_id": entry.spec.name,
        "model_sha": None,
        "model_dtype": info.dtype,
        "model_device_type": info.device,
        "model_pipeline_tag": task.value if task else None,
        "max_input_tokens": info.max_input_tokens,
        "max_input_length": info.max_input_tokens,
        "max_total_tokens": info.max_total_tokens,
        "max_best_of": 1,
        "max_stop_sequences": 4,
        "state": entry.backend.state.value,
        "router": "gateway",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }


async def text_generation(
    state: AppState,
    request: Request,
    entry: Entry,
    backend: Backend,
    call: HFCall,
    *,
    shape: Literal["list", "object"],
    stream: bool,
) -> Response:
    """Generate for `call`: a list (POST /, hosted API) or one object (/generate), or a TGI stream."""
    ctx = context(request)
    params = tgi.parse_parameters(call.parameters)
    prompts, many = tgi.prompts(call.inputs)
    if stream:
        if many:
            raise InvalidRequest("Streaming takes a single prompt; send a string as 'inputs'.", param="inputs")
        if params.decoder_input_details:
            raise InvalidRequest(
                "decoder_input_details is not available when streaming (as in TGI).", param="decoder_input_details"
            )
        return await _stream(state, request, entry, backend, prompts[0], params)

    async def one(prompt: str) -> tuple[dict[str, Any], Usage]:
        generation = params.to_domain(prompt, ctx.request_id)
        result = await run_generation(state, entry, backend, generation, ctx.received_at)
        choice = result.choices[0]
        body: dict[str, Any] = {"generated_text": tgi.generated(prompt, choice.text, params)}
        if params.details:
            seed = None if generation.sampling.greedy else generation.sampling.seed
            prefill = await backend.prompt_logprobs(generation) if params.decoder_input_details else []
            body["details"] = tgi.details_body(
                choice.tokens, choice.finish_reason, seed, prefill, generation.sampling.top_n,
                generated=result.usage.completion_tokens,
            )
        return body, result.usage

    # Cancelled if the client leaves: nobody would read the answer (the body has been read by now).
    results = await until_disconnect(ctx, gather_or_cancel(*(one(p) for p in prompts)))
    bodies = [body for body, _ in results]
    # As TGI does: the token counts in headers (its non-streamed details carry no input length).
    usage = Usage()
    for _, used in results:
        usage.add(used)
    headers = {"x-prompt-tokens": str(usage.prompt_tokens), "x-generated-tokens": str(usage.completion_tokens)}
    return FastJSONResponse(bodies[0] if shape == "object" and not many else bodies, headers=headers)


async def _stream(
    state: AppState, request: Request, entry: Entry, backend: Backend, prompt: str, params: tgi.TGIParameters
) -> Response:
    ctx = context(request)
    generation = params.to_domain(prompt, ctx.request_id)
    seed = None if generation.sampling.greedy else generation.sampling.seed
    events = await primed(stream_generation(state, entry, backend, generation, ctx.received_at))

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        # Each token is sent once the next event arrives: the last one carries
        # generated_text and details, which need the usage that ends the stream.
        pending: TokenDelta | None = None
        end: StreamEnd | None = None
        count, text = 0, ""
        try:
            async for event in events:
                if isinstance(event, StreamEnd):
                    end = event
                    break
                if pending is not None:
                    yield tgi.stream_event(count, pending)
                count += 1
                text += event.text
                pending = event
        except Exception:
            if pending is not None:  # the tokens made before a failure still reach the client
                yield tgi.stream_event(count, pending)
            raise
        if pending is None:
            return
        details = None
        if params.details:
            details = {
                "finish_reason": tgi.TGI_FINISH[pending.finish_reason] if pending.finish_reason else "length",
                "generated_tokens": count,
                "input_length": end.usage.prompt_tokens if end is not None else None,
                "seed": seed,
            }
        yield tgi.stream_event(count, pending, generated_text=tgi.generated(prompt, text, params), details=details)

    return sse_response(
        chunks(), error_event=hf_error_body, done_marker=False, ping_seconds=state.settings.server.sse_ping_seconds
    )


async def _default_call(request: Request, state: AppState) -> tuple[Entry, Backend, HFCall]:
    """The default model, loaded (a default whose task was unknown is checked once it is), and the call."""
    entry = default_entry(state, request)
    call = parse_call(read_body(await request.body(), "application/json"), Task.TEXT_GENERATION)
    backend = await state.registry.ensure_loaded(entry, wait=call.options.wait_for_model is not False)
    check_task(entry, Task.TEXT_GENERATION)
    return entry, backend, call


async def compat_generate(request: Request, state: StateDep) -> Response:
    """POST /: `stream` in the body picks a stream or a list of one result."""
    entry, backend, call = await _default_call(request, state)
    return await text_generation(state, request, entry, backend, call, shape="list", stream=bool(call.stream))


async def generate(request: Request, state: StateDep) -> Response:
    entry, backend, call = await _default_call(request, state)
    return await text_generation(state, request, entry, backend, call, shape="object", stream=False)


async def generate_stream(request: Request, state: StateDep) -> Response:
    entry, backend, call = await _default_call(request, state)
    return await text_generation(state, request, entry, backend, call, shape="object", stream=True)


async def info(request: Request, state: StateDep) -> dict[str, Any]:
    return info_body(default_entry(state, request))


router.add_api_route("/", compat_generate, methods=["POST"], response_model=None)
router.add_api_route("/generate", generate, methods=["POST"], response_model=None)
router.add_api_route("/generate_stream", generate_stream, methods=["POST"], response_model=None)
router.add_api_route("/info", info, methods=["GET"])
