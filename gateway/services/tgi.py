"""TGI text generation: one answer per prompt (with the prompt's own token details when asked),
or one prompt's event stream, from the default text-generation model or the model a URL names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NamedTuple

from gateway.backends.base import Capability, ModelInfo
from gateway.context import RequestContext
from gateway.domain import GenerationEvent, GenerationRequest, ModelState, Task
from gateway.errors import UnsupportedParameter
from gateway.protocol import tgi
from gateway.protocol.hf import HFCall
from gateway.protocol.tgi import Generated, TGIParameters
from gateway.services.metering import run_generation, stream_generation
from gateway.services.resolve import Resolved, resolve, resolve_entry
from gateway.services.streams import gather_or_cancel, primed, until_disconnect
from gateway.state import AppState


class Generations(NamedTuple):
    results: list[Generated]
    many: bool  # `inputs` was a list: the answer is a list whatever the route
    params: TGIParameters


class Streamed(NamedTuple):
    events: AsyncIterator[GenerationEvent]  # primed: a failure before the first token was raised already
    prompt: str
    seed: int | None
    params: TGIParameters


Outcome = Generations | Streamed


class Described(NamedTuple):
    name: str
    info: ModelInfo
    state: ModelState
    task: Task | None


# A model to generate with: a name (None: the default text-generation model) or one resolved already.
Model = str | None | Resolved


def _seed(request: GenerationRequest) -> int | None:
    return None if request.sampling.greedy else request.sampling.seed


def adapter_model(state: AppState, ctx: RequestContext, adapter: str) -> str:
    """TGI's `adapter_id`: the name of a served model that is a LoRA adapter (`backend.adapter`)."""
    entry = resolve_entry(state, ctx, adapter, placeholders=False)
    backend = entry.spec.backend
    if backend is None or backend.kind != "local" or backend.adapter is None:
        raise UnsupportedParameter("adapter_id", f"names '{adapter}', which is not a LoRA adapter model")
    return entry.spec.name


async def run(state: AppState, ctx: RequestContext, model: Model, call: HFCall, *, stream: bool) -> Outcome:
    """A parsed TGI call: the model is loaded (as `wait_for_model` says) before its parameters are judged."""
    wait = call.options.wait_for_model is not False
    prompts, many = tgi.prompts(call.inputs)
    if isinstance(model, Resolved):  # the HF route resolved it (an adapter_id included)
        target = model
    else:
        if (adapter := tgi.adapter_of(call.parameters)) is not None:
            model = adapter_model(state, ctx, adapter)
        cost = tgi.reserved_tokens(call.parameters, len(prompts))
        target = await resolve(state, ctx, model, Task.TEXT_GENERATION, wait=wait, cost=cost)
    params = tgi.parse_parameters(call.parameters)
    if stream:
        tgi.check_streamable(params, many)
        return await stream_one(state, ctx, target, params, prompts[0])
    return Generations(await generate(state, ctx, target, params, prompts), many, params)


async def generate(
    state: AppState, ctx: RequestContext, target: Resolved, params: TGIParameters, prompts: list[str]
) -> list[Generated]:
    """One answer per prompt, generated concurrently; the first failure cancels the others."""
    entry, backend = target
    wants_prefill = params.details and params.decoder_input_details
    if wants_prefill and Capability.PROMPT_LOGPROBS not in backend.capabilities:
        # refused before generating, not after a whole answer nobody will get
        raise UnsupportedParameter("decoder_input_details", f"is not supported by model '{backend.name}'")

    async def one(prompt: str) -> Generated:
        request = params.to_domain(prompt, ctx.request_id)
        result = await run_generation(state, entry, backend, request, ctx.received_at, ctx=ctx)
        prefill = await backend.prompt_logprobs(request) if wants_prefill else []
        return Generated(prompt, result, _seed(request), prefill)

    # Cancelled if the client leaves: nobody would read the answer (the body has been read by now).
    return await until_disconnect(ctx, gather_or_cancel(*(one(p) for p in prompts)))


async def stream_one(
    state: AppState, ctx: RequestContext, target: Resolved, params: TGIParameters, prompt: str
) -> Streamed:
    """The prompt's event stream, primed so that errors before any token are an HTTP error."""
    entry, backend = target
    request = params.to_domain(prompt, ctx.request_id)
    events = await primed(stream_generation(state, entry, backend, request, ctx.received_at, ctx=ctx))
    return Streamed(events, prompt, _seed(request), params)


def describe(state: AppState, ctx: RequestContext, name: str | None) -> Described:
    """What GET /info tells about a model (None: the default text-generation model; a name is
    exact, the URL names the model), without loading it."""
    if name is None:
        entry = resolve_entry(state, ctx, None, Task.TEXT_GENERATION)
    else:
        entry = resolve_entry(state, ctx, name, placeholders=False)
    return Described(entry.spec.name, entry.backend.info(), entry.backend.state, entry.task)
