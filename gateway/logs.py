"""Logging: the request id in every line of a request (a contextvar and a filter), JSON lines
when `server.json_logs` is on, and the one summary line per request the middleware writes.

JSON lines are written off the request path: each line is appended to a bounded buffer that a
background thread writes out every `FLUSH_SECONDS` (one write carries every line since the last).
The writer wakes on its own timer, never per line: waking it per line cost about 70 µs of CPU per
request in a served gateway at concurrency 16 (a futex wake and a handover of the interpreter for
each). Each of its turns still takes the interpreter from the event loop twice (on waking, and
after the write), so turns are 0.1 s apart: in a test loop the writer cost 1.7 µs of CPU per line
at 0.02 s, 0.7 at 0.1 s; in a served gateway (its thread's CPU over 20,000 requests) 2.5-3 µs a
line at 0.1 s. A request hands the writer its line's values (`request_line`); the writer formats
them from a template (`_format_request`), cheaper than building a dict for orjson. Every JSON line
(request lines and the other logs) goes through that one buffer, so lines keep their order; it is
flushed at the end of a drain, at shutdown and at exit. If the sink stalls (a full pipe), lines
past `MAX_PENDING` are dropped and counted, and a line saying how many follows.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import logging
import sys
import threading
import time
from typing import IO, Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Fields for the request's log line that code far below the routes knows (the deployment that
# answered). A dict per request, set only while request lines are logged: tasks the request
# spawns copy the context, so they fill the same dict.
request_fields: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "request_fields", default=None
)

# How often the writer writes what has gathered: a line is out at most this late.
FLUSH_SECONDS = 0.1
MAX_PENDING = 100_000  # lines waiting for the writer (a few tens of MB at most)


def note(**fields: object) -> None:
    """Add fields to the current request's log line (a no-op when none is being logged)."""
    holder = request_fields.get()
    if holder is not None:
        holder.update(fields)


access = logging.getLogger("gateway.access")


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request whose task logged it ("-" outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "request_id",
    "color_message",  # uvicorn's copy of the message with terminal colours
}

# (second, its text) and (millisecond, its text, as bytes): each replaced whole, so that threads
# formatting lines at once (the writer's request lines, any thread's log records) never see a
# millisecond paired with another's text.
_second_cache: tuple[int, str] = (-1, "")
_milli_cache: tuple[int, str, bytes] = (-1, "", b"")


def _milli_texts(created: float) -> tuple[int, str, bytes]:
    global _second_cache, _milli_cache
    milli = int(created * 1000)
    cached = _milli_cache
    if cached[0] == milli:
        return cached
    second = milli // 1000
    seconds = _second_cache
    if seconds[0] != second:
        seconds = _second_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    text = f"{seconds[1]}.{milli % 1000:03d}Z"
    cached = _milli_cache = (milli, text, text.encode())
    return cached


def timestamp(created: float) -> str:
    """`2026-11-30T03:32:28.967Z`: formatted once per millisecond (the date part once per second)."""
    return _milli_texts(created)[1]


def timestamp_bytes(created: float) -> bytes:
    """`timestamp` as ASCII bytes (for lines formatted as bytes)."""
    return _milli_texts(created)[2]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class LineSink:
    """JSON lines buffered in memory and written in batches by a daemon thread.

    `write` only appends to a deque (thread-safe without a lock); every `interval` the writer
    writes what is there with one call. Taking lines and writing them happen under one lock, so a
    `flush` from another thread (shutdown) never reorders them. A request line arrives as the
    tuple of its values and is formatted by the writer, in its batch: formatting hundreds of
    lines in a row costs a fraction of formatting each one between two requests, where little
    of it is still in the CPU's caches.
    """

    def __init__(self, stream: IO[str], max_pending: int = MAX_PENDING, interval: float = FLUSH_SECONDS) -> None:
        self.stream = stream
        self.max_pending = max_pending
        self.interval = interval
        self.dropped = 0  # lines dropped because the sink stalled (counted, then reported)
        self._reported = 0
        self._pending: collections.deque[bytes | RequestRecord] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="json-log-writer", daemon=True)
        self._thread.start()

    def write(self, line: bytes | RequestRecord) -> None:
        pending = self._pending
        if len(pending) >= self.max_pending:
            self.dropped += 1
            return
        pending.append(line)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)  # set only by close()
            if self._pending or self.dropped != self._reported:
                try:
                    self.flush()
                except Exception:  # a closed or broken stream: keep going, the lines are counted
                    pass

    def flush(self) -> None:
        """Write every pending line now (any thread)."""
        with self._lock:
            pending = self._pending
            take = pending.popleft
            batch: list[bytes] = []
            requests_logged = access.isEnabledFor(logging.INFO)
            while pending:
                for _ in range(len(pending)):
                    item = take()
                    if isinstance(item, tuple):
                        if not requests_logged:
                            continue
                        try:
                            item = _format_request(item)
                        except Exception:  # a value no line can carry: that line is lost, not the batch
                            self.dropped += 1
                            continue
                    batch.append(item)
            if self.dropped != self._reported:
                note = {"ts": timestamp(time.time()), "level": "warning", "logger": __name__, "request_id": "-"}
                note["msg"] = (
                    f"{self.dropped - self._reported} log lines dropped: the log sink stalled, or a line could not be formatted"
                )
                batch.append(orjson.dumps(note))
                self._reported = self.dropped
            if not batch:
                return
            batch.append(b"")
            data = b"\n".join(batch)
            raw = getattr(self.stream, "buffer", None)
            try:
                self.stream.flush()  # anything written to the text layer directly goes first
                if raw is not None:
                    raw.write(data)
                    raw.flush()
                else:
                    self.stream.write(data.decode())
                    self.stream.flush()
            except ValueError:  # the stream was closed (interpreter exit): nowhere to write
                pass

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()


class SinkHandler(logging.Handler):
    """The logging side of the sink: JSON lines of every other log go through the same buffer."""

    def __init__(self, sink: LineSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write(self.format(record).encode())
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self.sink.flush()


_sink: LineSink | None = None


# The names of a request line (method, path, route, status, key, model, deployment) recur from
# request to request: each combination is encoded once, as one piece of the line.
_NAMES_TEXT: dict[tuple[Any, ...], bytes] = {}
_NAMES_TEXT_MAX = 10_000  # past this many (paths are the caller's choice), encoded per line instead
_NAMES = b'"method":%s,"path":%s,"route":%s,"status":%d,"key":%s,"model":%s,"deployment":%s'

# The request line, formatted in one step (cheaper than a dict and orjson). The names go in as
# one piece; the last %s adds the request's other fields, each after a comma.
_REQUEST_LINE = (
    b'{"ts":"%s","level":"info","logger":"gateway.access","msg":"request","request_id":"%s",%s,'
    b'"total_ms":%s,"prompt_tokens":%d,"completion_tokens":%d,"ttft_ms":%s,"queue_ms":%s%s}'
)


def _names_text(names: tuple[Any, ...]) -> bytes:
    text = _NAMES_TEXT.get(names)
    if text is None:
        method, path, route, status, key, model, deployment = names
        text = _NAMES % (_json(method), _json(path), _json(route), status, _json(key), _json(model), _json(deployment))
        if len(_NAMES_TEXT) < _NAMES_TEXT_MAX:
            _NAMES_TEXT[names] = text
    return text


def _json(value: str | None) -> bytes:
    return b"null" if value is None else orjson.dumps(value)


def _ms(seconds: float | None) -> bytes:
    return b"null" if seconds is None else b"%.3f" % (seconds * 1000)


# A request line's values, formatted by the writer (`_format_request`): created (time.time()),
# request id, elapsed, prompt tokens, completion tokens, ttft, queue time (seconds or None), other
# fields (a dict, or None), then the names: method, path, route, status, key, model, deployment.
# Plain values only: a tuple of them is soon out of the garbage collector's sight, where one holding
# the request's objects for the writer's 0.1 s survived into the older generations and made
# full collections more frequent (the p99 at c=16 went from ~7 to ~18 ms).
RequestRecord = tuple[Any, ...]


def request_line(
    request_id: bytes,
    method: str,
    path: str,
    route: str,
    status: int,
    key: str | None,
    model: str | None,
    elapsed: float,
    context: Any,
    extra: dict[str, Any],
) -> None:
    """The request's summary line (never its prompt or output, unless `extra` carries them):
    handed to the sink as its values when JSON lines are configured, through the `gateway.access`
    logger otherwise. `request_id` is already safe to quote (the middleware's, [A-Za-z0-9._:-]);
    `context` is the request's RequestContext or None; `extra` are more fields (the deployment
    that answered, and with server.log_content the bodies)."""
    if context is None:
        prompt = completion = 0
        ttft = queued = None
    else:
        prompt, completion, ttft, queued = (
            context.prompt_tokens,
            context.completion_tokens,
            context.ttft,
            context.queue_time,
        )
    deployment = extra.get("deployment")
    others = None
    if len(extra) > (deployment is not None):
        others = {k: v for k, v in extra.items() if k != "deployment"}
    record = (
        time.time(),
        request_id,
        elapsed,
        prompt,
        completion,
        ttft,
        queued,
        others,
        method,
        path,
        route,
        status,
        key,
        model,
        deployment,
    )
    if _sink is None:
        access.info("request", extra=_fields(record))
    else:  # the writer drops it if `gateway.access` is not enabled for INFO then
        _sink.write(record)


def _fields(record: RequestRecord) -> dict[str, Any]:
    """A request record as the `extra` fields of a log record (when JSON lines are not configured)."""
    _, _, elapsed, prompt, completion, ttft, queued, others, method, path, route, status, key, model, deployment = (
        record
    )
    fields = {
        "method": method,
        "path": path,
        "route": route,
        "status": status,
        "key": key,
        "model": model,
        "total_ms": round(elapsed * 1000, 3),
        "deployment": deployment,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
        "queue_ms": None if queued is None else round(queued * 1000, 3),
    }
    fields.update(others or {})
    return fields


def _format_request(record: RequestRecord) -> bytes:
    created, rid, elapsed, prompt, completion, ttft, queued, others = record[:8]
    return _REQUEST_LINE % (
        timestamp_bytes(created),
        rid,
        _names_text(record[8:]),
        _ms(elapsed),
        prompt,
        completion,
        _ms(ttft),
        _ms(queued),
        b"," + orjson.dumps(others, default=str)[1:-1] if others else b"",
    )


def flush() -> None:
    """Write buffered JSON lines now (end of a drain, shutdown)."""
    if _sink is not None:
        _sink.flush()


def configure(level: str, *, json_lines: bool, stream: IO[str] | None = None) -> None:
    """Log to `stream` (stderr by default) as JSON lines or text, replacing the root's handlers."""
    global _sink
    stream = sys.stderr if stream is None else stream
    if _sink is not None:
        _sink.close()
        _sink = None
    handler: logging.Handler
    if json_lines:
        _sink = LineSink(stream)
        handler = SinkHandler(_sink)
        handler.setFormatter(JsonFormatter())
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


atexit.register(flush)
