"""A causal LM on the continuous-batching engine: prompt templating, prompt limits, token budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gateway.backends.base import Capability, QueueStats
from gateway.backends.local import tools
from gateway.backends.local.args import LocalArgs
from gateway.domain import (
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    StreamEnd,
    Task,
    TokenDelta,
    TopToken,
    Usage,
)
from gateway.engine import EngineObserver
from gateway.errors import InvalidRequest

if TYPE_CHECKING:
    import torch

    from gateway.engine import GenerationEngine, TextBound


class GenerativeModel:
    task = Task.TEXT_GENERATION
    capabilities = frozenset({Capability.GENERATE, Capability.PROMPT_LOGPROBS, Capability.LOGPROBS, Capability.ECHO})

    def __init__(
        self,
        args: LocalArgs,
        tokenizer: Any,
        model: Any,
        device: torch.device,
        dtype: torch.dtype,
        engine: GenerationEngine,
        on_failure: Callable[[str], None],
    ) -> None:
        from gateway.engine import text_bound

        self.name = args.name
        self.args = args
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.dtype = dtype
        self.engine = engine
        # the engine tells when its loop dies (it fails its requests and refuses new ones)
        engine.on_failure = on_failure
        self.vocab_rows = int(model.get_input_embeddings().weight.shape[0])  # token IDs the embedding has rows for
        self.text_bound: TextBound | None = text_bound(tokenizer)  # the longest prompt text that can fit, if known

    def observe(self, observer: EngineObserver) -> None:
        self.engine.observer = observer

    def context_length(self) -> int:
        """Longest sequence served: the engine's slot length."""
        return int(self.engine.max_len)

    def prompt_limit(self) -> int:
        """Longest prompt accepted: at least one token is generated after it."""
        return self.args.max_input_tokens or self.context_length() - 1

    def queue_stats(self) -> QueueStats:
        return QueueStats(
            waiting=self.engine.queue_depth(),
            running=self.engine.running,
            capacity=self.engine.max_queue,
            prefix_blocks=self.engine.prefix_cache_blocks(),
        )

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)

    # prompts ---------------------------------------------------------------
    def _refuse_long_text(self, text: str, request: GenerationRequest, param: str) -> None:
        """Refuse, before tokenizing, a text too long for any tokenization of it to fit."""
        if self.text_bound is None or request.truncate:
            return  # no bound for this tokenizer; or TGI's `truncate` keeps the end of any prompt
        limit = self.prompt_limit()
        size = self.text_bound.too_long(text, limit)
        if size is not None:
            raise InvalidRequest(
                f"The prompt has {size} characters: more than the {limit} tokens this model accepts, "
                f"whatever the text (no token of its vocabulary spans over {self.text_bound.chars_per_token}).",
                param=param,
            )

    def _known_ids(self, ids: list[int]) -> list[int]:
        """Token IDs given as the prompt, each checked against the vocabulary: one out of range would
        fail the embedding lookup of the whole batch, every neighbour's stream with it."""
        rows = self.vocab_rows
        if not ids or (0 <= min(ids) and max(ids) < rows):
            return ids
        for position, token in enumerate(ids):
            if not 0 <= token < rows:
                raise InvalidRequest(
                    f"Token ID {token} at position {position} of the prompt is outside this model's "
                    f"vocabulary (IDs 0 to {rows - 1}).",
                    param="prompt",
                )
        return ids

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        if request.messages is not None:
            if not tok.chat_template:
                raise InvalidRequest(
                    f"Model '{self.name}' has no chat template; use /v1/completions with a plain prompt.",
                    param="messages",
                )
            text = self._render_chat(request)
            self._refuse_long_text(text, request, "messages")  # rendering is cheap, tokenizing is not
            return list(tok(text, add_special_tokens=False)["input_ids"])
        if isinstance(request.prompt, list):
            return self._known_ids(list(request.prompt))
        self._refuse_long_text(request.prompt or "", request, "prompt")
        return list(tok(request.prompt or "")["input_ids"])

    def _render_chat(self, request: GenerationRequest) -> str:
        """The chat prompt; tools through the template when it takes them, else the generic format."""
        tok = self.tokenizer
        if tools.template_takes_tools(tok) and request.messages is not None:
            messages = tools.template_messages(request.messages)
            extra = {"tools": tools.template_tools(request)} if request.calls_tools else {}
            return str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra))
        return str(tok.apply_chat_template(tools.generic_messages(request), add_generation_prompt=True, tokenize=False))

    def _budget(self, prompt_ids: list[int], asked: int | None) -> int:
        context = self.context_length()
        limit = self.prompt_limit()
        if not prompt_ids:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        if len(prompt_ids) > limit:
            raise InvalidRequest(
                f"The prompt has {len(prompt_ids)} tokens; this model accepts at most {limit}.", param="messages"
            )
        room = context - len(prompt_ids)
        if asked is None:
            return min(self.args.default_max_tokens, room)
        if asked > room:
            raise InvalidRequest(
                f"max_tokens={asked} plus the prompt's {len(prompt_ids)} tokens exceed the model's "
                f"context of {context} tokens.",
                param="max_tokens",
            )
        return asked

    def _validated_prompt(self, request: GenerationRequest) -> tuple[list[int], int]:
        if request.sampling.grammar is not None:  # compiled (and cached) here, off the event loop
            self.engine.compile_grammar(request.sampling.grammar)
        prompt_ids = self._prompt_ids(request)
        if request.truncate:
            prompt_ids = prompt_ids[-request.truncate :]
        return prompt_ids, self._budget(prompt_ids, request.sampling.max_tokens)

    # operations ------------------------------------------------------------
    def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if not request.calls_tools:
            return self._generate(request)
        return tools.tool_events(self._generate(tools.with_tool_grammar(request)), request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        # Templating and tokenising a long prompt takes milliseconds: not on the event loop.
        prompt_ids, max_tokens = await asyncio.get_running_loop().run_in_executor(None, self._validated_prompt, request)
        if request.echo:
            echoed = await self._echoed(request, prompt_ids)
            alone = max_tokens == 0  # the prompt scored, nothing generated: it ends each choice
            for index in range(request.sampling.n):
                for number, delta in enumerate(echoed, 1):
                    ends = alone and number == len(echoed)
                    yield replace(delta, index=index, finish_reason=FinishReason.LENGTH if ends else None)
            if alone:
                yield StreamEnd(Usage(prompt_tokens=len(prompt_ids)))
                return
        async for event in self.engine.stream(
            prompt_ids, request.sampling, max_tokens, request.keep_stop, request_id=request.request_id
        ):
            yield event

    async def _echoed(self, request: GenerationRequest, ids: list[int]) -> list[TokenDelta]:
        """The prompt as OpenAI's `echo` repeats it: its text, and with logprobs one delta per
        token, each with its log-probability given the tokens before it. The last delta carries
        the whole text, so that a stream sends the prompt in one chunk with all its tokens."""
        sampling = request.sampling
        text = request.prompt if isinstance(request.prompt, str) else self.tokenizer.decode(ids)
        if not sampling.logprobs:
            return [TokenDelta(0, text, echoed=True)]
        scores = await self.engine.score(ids, sampling.top_n)
        special = set(self.tokenizer.all_special_ids)
        deltas = []
        for i, token in enumerate(ids):
            top: tuple[TopToken, ...] = ()
            if i and sampling.top_n:
                top_ids, top_logprobs = scores.top[i - 1]
                top = tuple(self._top(t, lp, special) for t, lp in zip(top_ids, top_logprobs, strict=True))
            logprob = scores.logprobs[i - 1] if i else None
            own = self.engine.token_text(token)
            last = i == len(ids) - 1
            deltas.append(TokenDelta(0, text if last else "", token, logprob, token in special, None, top, own, True))
        return deltas

    def _top(self, token: int, logprob: float, special: set[int]) -> TopToken:
        own = self.engine.token_text(token)
        return TopToken(token, own.text, logprob, token in special, own.raw)

    async def prompt_logprobs(self, request: GenerationRequest) -> list[TokenDelta]:
        # the same checks as the generation it comes with, off the event loop
        ids, _ = await asyncio.get_running_loop().run_in_executor(None, self._validated_prompt, request)
        scores = (await self.engine.score(ids)).logprobs
        special = set(self.tokenizer.all_special_ids)
        return [
            TokenDelta(0, self.tokenizer.decode([token]), token, None if i == 0 else scores[i - 1], token in special)
            for i, token in enumerate(ids)
        ]
