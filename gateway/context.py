"""What the service layer knows about the HTTP request it serves, without knowing HTTP.

A route makes one RequestContext per request (`routes/common/deps.context`, from what the
middleware put in the request's state) and keeps it there, where the middleware reads the
model label; services take it instead of a framework request object, so they can be called
(and tested) without FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.auth.keys import ApiKey
from gateway.auth.limits import Admission


@dataclass(slots=True)
class RequestContext:
    request_id: str
    received_at: float  # time.perf_counter() when the request arrived
    # Resolves when the client disconnects; await it only after the body was read
    # (the next ASGI receive() then returns only on disconnect).
    wait_disconnect: Callable[[], Awaitable[object]]
    deadline: float | None = None  # time.perf_counter() by which the answer is due (for per-key limits; unset today)
    identity: str | None = None  # the API key's name (logs, usage); None when no key is configured
    model: str | None = None  # the model name for metrics labels; set by services.resolve
    keep_alive: float | None = None  # the request's own keep_alive (Ollama's), for the model it resolves
    # Released once the response has been sent (middleware): the model's in-flight count, so that
    # an unload waits for this request, its stream included.
    releases: list[Callable[[], None]] = field(default_factory=list)
    key: ApiKey | None = None  # the caller's key: its models, limits and cache visibility
    admission: Admission | None = None  # the per-key limits' charge, settled when the request ends
    prompt_tokens: int = 0  # counted by services.metering, for the request's log line and limits
    completion_tokens: int = 0
    ttft: float | None = None  # seconds from arrival to the first token
    queue_time: float | None = None  # seconds waited for a batch slot (local engines), when known
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # added by the middleware

    def release(self) -> None:
        for release in self.releases:
            release()
        self.releases.clear()
