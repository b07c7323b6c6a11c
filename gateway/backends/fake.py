"""A deterministic backend with no model: the HTTP stack can be exercised without weights.

Generation echoes the prompt's words (greedy) or draws from them with the
request's seed (sampling); embeddings are seeded by a hash of the text.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import AsyncIterator

from gateway.backends.base import Backend, Capability, GenerationEvent, ModelInfo
from gateway.config import FakeBackendSpec, ModelSpec
from gateway.detokenize import TextAssembler
from gateway.domain import (
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationRequest,
    StreamEnd,
    Task,
    TokenDelta,
    Usage,
)
from gateway.errors import UnsupportedParameter


class _WordTokenizer:
    """Just enough of a tokenizer for TextAssembler: one id per word."""

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(self.words[i] for i in ids)


class FakeBackend(Backend):
    capabilities = frozenset({Capability.GENERATE, Capability.EMBED})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec.name)
        assert isinstance(spec.backend, FakeBackendSpec)
        self.fake = spec.backend
        self.task = spec.task or Task.TEXT_GENERATION

    async def _load(self) -> None:
        return None

    def info(self) -> ModelInfo:
        return ModelInfo(task=self.task, dtype="float32", device="cpu", max_input_tokens=4095, max_total_tokens=4096)

    @staticmethod
    def _prompt_words(request: GenerationRequest) -> list[str]:
        if request.messages is not None:
            text = (request.messages[-1].content or "") if request.messages else ""
        elif isinstance(request.prompt, list):
            text = " ".join(str(t) for t in request.prompt)
        else:
            text = request.prompt or ""
        words = text.split()[-request.truncate :] if request.truncate else text.split()
        return [w if i == 0 else " " + w for i, w in enumerate(words)] or ["..."]

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        params = request.sampling
        if params.grammar is not None:  # echoes words: it cannot follow a grammar, so it refuses one
            raise UnsupportedParameter(params.grammar.param, f"is not supported by model '{self.name}'")
        if request.calls_tools:
            raise UnsupportedParameter("tools", f"is not supported by model '{self.name}'")
        words = self._prompt_words(request)
        max_tokens = params.max_tokens if params.max_tokens is not None else len(words)
        produced = 0
        for index in range(params.n):
            rng = random.Random(None if params.seed is None else params.seed + index)
            assembler = TextAssembler(_WordTokenizer(words), params.stop, request.keep_stop)
            for step in range(max_tokens):
                if self.fake.delay_ms:
                    await asyncio.sleep(self.fake.delay_ms / 1000)
                token = step % len(words) if params.greedy else rng.randrange(len(words))
                produced += 1
                text = assembler.push(token)
                finish = None
                if assembler.stopped:
                    finish = FinishReason.STOP
                elif params.greedy and step == len(words) - 1:
                    text, finish = text + assembler.flush(), FinishReason.EOS  # echoed the whole prompt
                elif step + 1 == max_tokens:
                    text, finish = text + assembler.flush(), FinishReason.LENGTH
                yield TokenDelta(index, text, token, -0.5, False, finish)
                if finish is not None:
                    break
        yield StreamEnd(Usage(prompt_tokens=len(words), completion_tokens=produced))

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        vectors = []
        for text in request.inputs:
            seed = int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:8], "little")
            rng = random.Random(seed)
            vec = [rng.uniform(-1, 1) for _ in range(request.dimensions or self.fake.dimensions)]
            if request.normalize is not False:
                norm = math.sqrt(sum(v * v for v in vec)) or 1.0
                vec = [v / norm for v in vec]
            vectors.append(vec)
        tokens = sum(len(t) if isinstance(t, list) else len(t.split()) for t in request.inputs)
        return EmbeddingResult(vectors=vectors, usage=Usage(prompt_tokens=tokens))
