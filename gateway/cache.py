"""Response cache: exact-match answers to deterministic requests, replayed byte for byte.

What is cached (`cache_key`): OpenAI generation with `temperature: 0` or a `seed`, embeddings,
TGI generation without sampling (or with a seed), and every HF task route (as the hosted API
does) unless `options.use_cache: false`. `Cache-Control: no-cache` skips the lookup too. The key
is the path, the request normalised (sorted JSON) and the caller key's model visibility, so keys
that may not see the same models never share an answer. Stored: status 200 answers only, whole
(a stream with an in-band error is not kept); a stream is replayed with its SSE framing.

Memory (an LRU of `response_cache_entries`) by default, Redis when server.redis_url is set.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

_GENERATION = ("/v1/chat/completions", "/v1/completions")
_ALWAYS = ("/v1/embeddings",)
_TGI = ("/", "/generate", "/generate_stream")
_HF_PREFIX = "/models/"


@dataclass(slots=True)
class Cached:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    model: str

    def dump(self) -> bytes:
        head = {
            "s": self.status,
            "m": self.model,
            "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
        }
        return orjson.dumps(head) + b"\n" + self.body

    @classmethod
    def load(cls, blob: bytes) -> Cached:
        head, _, body = blob.partition(b"\n")
        meta = orjson.loads(head)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["h"]]
        return cls(meta["s"], headers, body, meta["m"])


def _deterministic_openai(body: dict[str, Any]) -> bool:
    return body.get("temperature") == 0 or body.get("seed") is not None


def _deterministic_tgi(body: dict[str, Any]) -> bool:
    params = body.get("parameters") or {}
    return isinstance(params, dict) and (not params.get("do_sample") or params.get("seed") is not None)


def cacheable(path: str) -> bool:
    """Whether requests on `path` may be cached at all (the body decides the rest)."""
    return path in _GENERATION or path in _ALWAYS or path in _TGI or path.startswith(_HF_PREFIX)


def cache_key(path: str, raw: bytes, content_type: str, visibility: str) -> tuple[str | None, bool]:
    """(key, bypass): the key when the request is cacheable; bypass when it asked not to be served from cache."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    bypass = False
    if not isinstance(body, dict):  # raw media (HF image tasks) or a body the route will refuse
        if not path.startswith(_HF_PREFIX) or not raw:
            return None, False
        normal = hashlib.sha256(raw).digest() + content_type.encode()
    else:
        options = body.get("options")
        options = options if isinstance(options, dict) else {}
        if path in _GENERATION or path.endswith(_GENERATION):
            ok = _deterministic_openai(body)
        elif path in _TGI:
            ok = _deterministic_tgi(body)
        else:
            ok = True
        if not ok:
            return None, False
        bypass = options.get("use_cache") is False
        # `options` (use_cache, wait_for_model) do not change the answer
        normal = orjson.dumps({k: v for k, v in body.items() if k != "options"}, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(path.encode() + b"\0" + visibility.encode() + b"\0" + normal).hexdigest()
    return digest, bypass


def storable(cached: Cached, sse: bool) -> bool:
    return cached.status == 200 and not (sse and b'data: {"error"' in cached.body)


class MemoryCache:
    def __init__(self, entries: int, ttl: float) -> None:
        self.entries = entries
        self.ttl = ttl
        self._items: OrderedDict[str, tuple[float, Cached]] = OrderedDict()

    async def get(self, key: str) -> Cached | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    async def put(self, key: str, value: Cached) -> None:
        self._items[key] = (time.monotonic() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.entries:
            self._items.popitem(last=False)


class RedisCache:
    def __init__(self, redis: Any, ttl: float, prefix: str = "gateway:cache:") -> None:
        self.redis = redis
        self.ttl = max(1, round(ttl))
        self.prefix = prefix

    async def get(self, key: str) -> Cached | None:
        blob = await self.redis.get(self.prefix + key)
        return None if blob is None else Cached.load(blob)

    async def put(self, key: str, value: Cached) -> None:
        await self.redis.set(self.prefix + key, value.dump(), ex=self.ttl)
