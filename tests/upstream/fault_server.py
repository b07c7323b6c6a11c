"""A scriptable upstream on loopback: speaks OpenAI, TGI and HF per-task, and fails on demand.

Each request pops the next behaviour queued for its path (default "ok"), so a test
states exactly what the upstream does, then counts the hits it received. A stream that
goes bad mid-way (malformed event, error event, stall) then stays open, as a real
upstream may: only the gateway closing it ends it, which is what the tests check.
"hang" never answers: the request ends only when the gateway hangs up, so a test can time
the gateway's own limits without an answer that would come at some point anyway.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, defaultdict, deque
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.helpers import free_port

WORDS = ["Hello", " from", " the", " upstream"]


class FaultUpstream:
    def __init__(self) -> None:
        self.script: dict[str, deque[str]] = defaultdict(deque)
        self.hits: Counter[str] = Counter()
        self.arrivals: dict[str, list[float]] = defaultdict(list)  # time.monotonic() of each hit
        self.hung_up: list[float] = []  # time.monotonic() at which the gateway gave up on each "hang"
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.healthy = True
        self.active_streams = 0
        self.retry_after = "1"
        self.slow_seconds = 2.0
        self.stream_gap = 0.5  # seconds between the events of a "trickle" stream
        routes = [
            Route("/v1/chat/completions", self._scripted(self.openai), methods=["POST"]),
            Route("/v1/completions", self._scripted(self.openai), methods=["POST"]),
            Route("/v1/embeddings", self._scripted(self.openai), methods=["POST"]),
            Route("/v1/models", self.health, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/generate", self._scripted(self.tgi), methods=["POST"]),
            Route("/generate_stream", self._scripted(self.tgi), methods=["POST"]),
            Route("/hf/model", self._scripted(self.hf), methods=["POST"]),
            Route("/hf/classifier", self._scripted(self.hf_task), methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FaultUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fault upstream did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def queue(self, path: str, *behaviours: str) -> None:
        self.script[path].extend(behaviours)

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def _reset(self, request: Request) -> None:
        """Abort this request's TCP connection (an RST), as a crashed upstream or a proxy would."""
        client = tuple(request.scope["client"])
        for connection in list(self.server.server_state.connections):
            if tuple(getattr(connection, "client", None) or ()) == client:
                connection.transport.abort()

    # --- behaviours -----------------------------------------------------------
    async def _intake(self, request: Request) -> tuple[str, dict[str, Any]]:
        path = request.url.path
        self.hits[path] += 1
        self.arrivals[path].append(time.monotonic())
        body = orjson.loads(await request.body())
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        script = self.script[path]
        return (script.popleft() if script else "ok"), body

    def _scripted(self, answer: Any) -> Any:
        """An endpoint that takes the request in, fails as scripted, or else lets `answer` answer it."""

        async def endpoint(request: Request) -> Response:
            behaviour, body = await self._intake(request)
            failure = self._failure(behaviour)
            return failure if failure is not None else await answer(request, behaviour, body)

        return endpoint

    def _failure(self, behaviour: str) -> Response | None:
        if behaviour == "429":
            return Response(
                orjson.dumps({"error": {"message": "slow down", "type": "rate_limit"}}),
                status_code=429,
                headers={"Retry-After": self.retry_after, "content-type": "application/json"},
            )
        if behaviour in ("500", "502", "503", "504", "400", "401"):
            body = orjson.dumps({"error": {"message": f"upstream says {behaviour}", "type": "x"}})
            return Response(body, status_code=int(behaviour), media_type="application/json")
        if behaviour == "malformed":
            return Response(b'{"choices": [', media_type="application/json")
        if behaviour == "no_choices":  # valid JSON, nothing to answer with
            return Response(orjson.dumps({"id": "x", "object": "chat.completion", "choices": []}))
        return None

    async def health(self, request: Request) -> Response:
        self.hits[request.url.path] += 1
        if not self.healthy:
            return Response(b"{}", status_code=503)
        return Response(orjson.dumps({"object": "list", "data": []}), media_type="application/json")

    def _sse(self, request: Request, events: list[bytes], behaviour: str, done: bytes | None) -> StreamingResponse:
        gap = {"slow_stream": 0.5, "trickle": self.stream_gap}.get(behaviour, 0)

        async def body() -> Any:
            self.active_streams += 1
            try:
                for number, event in enumerate(events):
                    if behaviour == "reset" and number == 2:
                        await asyncio.sleep(0.05)  # an RST discards what is still buffered: let it go out
                        self._reset(request)
                        return
                    if behaviour == "reset_early":
                        raise ConnectionResetError("injected reset before the first event")
                    if behaviour == "truncated" and number == 2:
                        return  # a clean end of the body, with the answer unfinished
                    if behaviour == "malformed_stream" and number == 1:
                        yield b"data: {not json\n\n"
                        await asyncio.sleep(30)  # and hang on: the gateway must hang up
                    if behaviour == "error_event" and number == 1:
                        yield b'data: {"error": {"message": "out of memory"}}\n\n'
                        await asyncio.sleep(30)
                    if behaviour == "stall" and number == 2:
                        await asyncio.sleep(30)  # no more events, the connection still open
                    yield b"data: " + event + b"\n\n"
                    await asyncio.sleep(gap)
                if done is not None and behaviour != "no_done":
                    yield done
            finally:
                self.active_streams -= 1

        return StreamingResponse(body(), media_type="text/event-stream")

    async def _until_hung_up(self, request: Request) -> Response:
        """Answer nothing until the client (the gateway) closes the connection (at most a minute)."""
        async with asyncio.timeout(60):
            while (await request.receive())["type"] != "http.disconnect":
                pass
        self.hung_up.append(time.monotonic())
        return Response(status_code=500)  # nobody is left to read it

    async def openai(self, request: Request, behaviour: str, body: dict[str, Any]) -> Response:
        if behaviour == "hang":
            return await self._until_hung_up(request)
        if behaviour == "slow":
            await asyncio.sleep(self.slow_seconds)
        path = request.url.path
        if path.endswith("/embeddings"):
            data = [
                {"object": "embedding", "index": i, "embedding": [0.5, -0.25, float(i)]}
                for i in range(len(body["input"]))
            ]
            return Response(
                orjson.dumps({"object": "list", "data": data, "usage": {"prompt_tokens": 3, "total_tokens": 3}})
            )
        chat = path.endswith("/chat/completions")
        words = WORDS if behaviour != "slow_stream" else WORDS * 20
        if not body.get("stream"):
            text = "".join(words)
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            )
            choice["finish_reason"] = "stop"
            usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
            answer = Response(
                orjson.dumps({"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage})
            )
            if behaviour == "set_cookie":  # as a load balancer pinning a session would
                answer.set_cookie("upstream_session", "client-one-secret")
            return answer
        events = []
        for number, word in enumerate(words):
            last = number == len(words) - 1
            choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
            choice["finish_reason"] = "length" if last else None
            events.append(orjson.dumps({"id": "x", "choices": [choice]}))
        usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
        events.append(orjson.dumps({"id": "x", "choices": [], "usage": usage}))
        return self._sse(request, events, behaviour, b"data: [DONE]\n\n")

    async def tgi(self, request: Request, behaviour: str, body: dict[str, Any]) -> Response:
        stream = request.url.path.endswith("/generate_stream")
        return self._tgi_answer(request, behaviour, stream, body)

    def _tgi_answer(
        self, request: Request, behaviour: str, stream: bool, body: dict[str, Any] | None = None
    ) -> Response:
        if not stream:
            # As TGI answers with details: tokens (and top_tokens when asked), prefill only with
            # decoder_input_details, and the prompt's length in the x-prompt-tokens header alone.
            params = (body or {}).get("parameters") or {}
            top_n = params.get("top_n_tokens") or 0
            tokens = [{"id": i, "text": w, "logprob": -0.1 * (i + 1), "special": False} for i, w in enumerate(WORDS)]
            details: dict[str, Any] = {
                "finish_reason": "length",
                "generated_tokens": len(WORDS),
                "seed": None,
                "prefill": [],
                "tokens": tokens,
                "top_tokens": [[{**t, "id": t["id"] + k} for k in range(top_n)] for t in tokens] if top_n else None,
            }
            prompt_tokens = len(str((body or {}).get("inputs", "")).split())
            return Response(
                orjson.dumps({"generated_text": "".join(WORDS), "details": details}),
                headers={"x-prompt-tokens": str(prompt_tokens), "x-generated-tokens": str(len(WORDS))},
            )
        events = []
        for number, word in enumerate(WORDS):
            last = number == len(WORDS) - 1
            event: dict[str, Any] = {
                "index": number + 1,
                "token": {"id": number, "text": word, "logprob": -0.1, "special": False},
                "generated_text": "".join(WORDS) if last else None,
                "details": {"finish_reason": "eos_token", "generated_tokens": 4, "input_length": 2, "seed": None}
                if last
                else None,
            }
            events.append(orjson.dumps(event))
        return self._sse(request, events, behaviour, None)

    async def hf(self, request: Request, behaviour: str, body: dict[str, Any]) -> Response:
        """An HF Inference Endpoint for text generation (a prompt) or feature extraction (a list)."""
        inputs = body["inputs"]
        if isinstance(inputs, list):  # feature extraction: one vector per input
            return Response(orjson.dumps([[float(len(text)), 1.0] for text in inputs]))
        if body.get("stream"):
            return self._tgi_answer(request, behaviour, True)
        return Response(orjson.dumps([{"generated_text": "".join(WORDS)}]))

    async def hf_task(self, request: Request, behaviour: str, body: dict[str, Any]) -> Response:
        """An HF endpoint for a classification task: one output per item of a list, one for a single input."""
        inputs = body["inputs"]
        if isinstance(inputs, list):
            return Response(orjson.dumps([[{"label": "POSITIVE", "score": 0.9, "echo": item}] for item in inputs]))
        return Response(orjson.dumps([{"label": "POSITIVE", "score": 0.9, "echo": inputs}]))
