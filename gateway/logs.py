"""Logging: the request id in every line of a request (a contextvar and a filter), JSON lines
when `server.json_logs` is on, and the one summary line per request the middleware writes.

JSON lines are written off the request path: each line is appended to a bounded buffer that a
background thread writes out every `FLUSH_SECONDS` (one write carries every line since the last).
The writer wakes on its own timer, never per line: waking it per line cost about 70 µs of CPU per
request in a served gateway at concurrency 16 (a futex wake and a handover of the interpreter for
each), far more than building the line (orjson, about 2 µs), which is all a request pays now. Every
JSON line (request lines and the other logs) goes through that one buffer, so lines keep their
order; it is flushed at the end of a drain, at shutdown and at exit. If the sink stalls (a full
pipe), lines past `MAX_PENDING` are dropped and counted, and a line saying how many follows.
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
FLUSH_SECONDS = 0.02
MAX_PENDING = 50_000  # lines waiting for the writer (a few tens of MB at most)


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

_second = -1
_second_text = ""
_milli = -1
_milli_text = ""


def timestamp(created: float) -> str:
    """`2026-11-30T03:32:28.967Z`: formatted once per millisecond (the date part once per second)."""
    global _second, _second_text, _milli, _milli_text
    milli = int(created * 1000)
    if milli != _milli:
        second = milli // 1000
        if second != _second:
            _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            _second = second
        _milli_text = f"{_second_text}.{milli % 1000:03d}Z"
        _milli = milli
    return _milli_text


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
    `flush` from another thread (shutdown) never reorders them.
    """

    def __init__(self, stream: IO[str], max_pending: int = MAX_PENDING, interval: float = FLUSH_SECONDS) -> None:
        self.stream = stream
        self.max_pending = max_pending
        self.interval = interval
        self.dropped = 0  # lines dropped because the sink stalled (counted, then reported)
        self._reported = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="json-log-writer", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
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
            batch = []
            try:
                while True:
                    batch.append(pending.popleft())
            except IndexError:
                pass
            if self.dropped != self._reported:
                note = {"ts": timestamp(time.time()), "level": "warning", "logger": __name__, "request_id": "-"}
                note["msg"] = f"{self.dropped - self._reported} log lines dropped: the log sink stalled"
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
_INFO = logging.INFO


def request_line(fields: dict[str, Any]) -> None:
    """The request's summary line: built with orjson straight into the sink when JSON logs are
    configured (no LogRecord on the hot path), through the `gateway.access` logger otherwise."""
    sink = _sink
    if sink is None:
        access.info("request", extra=fields)
        return
    if not access.isEnabledFor(_INFO):
        return
    line = {
        "ts": timestamp(time.time()),
        "level": "info",
        "logger": "gateway.access",
        "msg": "request",
        "request_id": request_id_var.get() or "-",
        **fields,
    }
    sink.write(orjson.dumps(line, default=str))


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
