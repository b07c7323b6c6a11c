"""Logging: the request id in every line of a request (a contextvar and a filter), JSON lines
when `server.json_logs` is on, and the one summary line per request the middleware writes."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Fields for the request's log line that code far below the routes knows (the deployment that
# answered). A dict per request, set only while request lines are logged: tasks the request
# spawns copy the context, so they fill the same dict.
request_fields: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "request_fields", default=None
)


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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str, *, json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
